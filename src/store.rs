//! The worker's SQL: reading a batch, and recording what happened to it. Everything here runs
//! inside a transaction opened by [`crate::worker`] and raises Postgres errors on failure,
//! which the worker catches.
//!
//! A batch is read in row order, skipping rows waiting for a retry and every later row of an
//! aggregate that has a row waiting for a retry: an aggregate's events never overtake each
//! other. Both checks use small partial indexes that only hold retrying rows.

use pg_outbox_core::message::OutboxMessage;
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiResult};
use std::cell::RefCell;
use std::time::{Duration, Instant};

/// The schema version this library's SQL expects (`pg_extension.extversion`).
pub const SCHEMA_VERSION: &str = env!("CARGO_PKG_VERSION");

const EXTENSION_STATE: &str = "SELECT e.extversion::text, to_regclass('outbox.messages')::oid::int8 \
    FROM pg_catalog.pg_extension e WHERE e.extname = 'pg_outbox'";

// The next publishable rows above the floor ($2), in row order: ids only, so that rows already
// handed to the publisher cost little to skip.
const SELECT_CANDIDATES: &str = "\
SELECT m.id
  FROM outbox.messages m
 WHERE m.id > $2
   AND (m.next_attempt_at IS NULL OR m.next_attempt_at <= now())
   AND NOT EXISTS (SELECT 1 FROM outbox.messages r
                    WHERE r.next_attempt_at IS NOT NULL
                      AND r.next_attempt_at > now()
                      AND r.aggregate_id = m.aggregate_id
                      AND r.aggregate_type IS NOT DISTINCT FROM m.aggregate_type
                      AND r.id < m.id)
 ORDER BY m.id
 LIMIT $1";

const SELECT_ROWS: &str = "\
SELECT m.id, m.message_id::text, m.event_type, m.payload::text, m.aggregate_type, m.aggregate_id,
       m.headers::text, m.routing_key, m.exchange,
       extract(epoch FROM m.created_at)::int8, m.attempts
  FROM outbox.messages m
 WHERE m.id = ANY ($1)
 ORDER BY m.id";

const DELETE_PUBLISHED: &str = "DELETE FROM outbox.messages WHERE id = ANY($1)";

const RECORD_FAILURES: &str = "\
UPDATE outbox.messages m
   SET attempts = m.attempts + 1,
       next_attempt_at = now() + f.delay_ms * interval '1 millisecond',
       last_error = f.error
  FROM unnest($1::int8[], $2::int8[], $3::text[]) AS f(id, delay_ms, error)
 WHERE m.id = f.id";

const DEAD_LETTER: &str = "\
WITH f AS (SELECT * FROM unnest($1::int8[], $2::text[]) AS f(id, error)),
     moved AS (DELETE FROM outbox.messages m USING f WHERE m.id = f.id
               RETURNING m.*, f.error AS final_error)
INSERT INTO outbox.dead_letters
       (message_id, event_type, payload, aggregate_type, aggregate_id, headers, routing_key,
        exchange, created_at, attempts, last_error)
SELECT message_id, event_type, payload, aggregate_type, aggregate_id, headers, routing_key,
       exchange, created_at, attempts + 1, final_error
  FROM moved";

/// The last row id handed out (a transaction may still hold it uncommitted).
const LAST_ID: &str =
    "SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END FROM outbox.messages_id_seq";
/// Every transaction below a snapshot's xmin has ended.
const SNAPSHOT_XMIN: &str = "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::int8";
const LOWEST_ROW_UP_TO: &str = "SELECT min(id) FROM outbox.messages WHERE id > $1 AND id <= $2";
const OUTBOX_BYTES: &str = "SELECT pg_relation_size('outbox.messages') + pg_indexes_size('outbox.messages')";
const ANY_ROW: &str = "SELECT EXISTS (SELECT 1 FROM outbox.messages)";
const TRUNCATE: &str = "TRUNCATE outbox.messages";

const NEXT_RETRY_IN: &str = "\
SELECT (extract(epoch FROM min(next_attempt_at) - now()) * 1000)::int8
  FROM outbox.messages WHERE next_attempt_at IS NOT NULL";

/// What the worker found of the extension in its database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Schema {
    Missing,
    /// Installed, but at another version than this library's (an upgrade is half done).
    OtherVersion(String),
    /// Installed; the table is locked for this transaction.
    Ready,
    /// The table is locked by someone else (DROP EXTENSION, say): stay out of the way.
    Busy,
}

/// A failed attempt to record: either retried later or moved to the dead letters.
#[derive(Debug, Clone)]
pub struct Failure {
    pub row_id: i64,
    pub error: String,
    /// `None`: dead-letter it.
    pub retry_after: Option<Duration>,
}

thread_local! {
    static PLANS: RefCell<Vec<(&'static str, OwnedPreparedStatement)>> = const { RefCell::new(Vec::new()) };
}

/// Runs `sql` with a plan prepared once per worker and kept for its life (plans revalidate
/// themselves when the extension is dropped and created again).
fn run<'conn, T>(
    client: &mut SpiClient<'conn>,
    sql: &'static str,
    args: &[DatumWithOid],
    read: impl FnOnce(pgrx::spi::SpiTupleTable<'_>) -> SpiResult<T>,
) -> SpiResult<T> {
    PLANS.with(|plans| {
        let mut plans = plans.borrow_mut();
        let position = match plans.iter().position(|(s, _)| *s == sql) {
            Some(p) => p,
            None => {
                let oids: Vec<PgOid> = args.iter().map(|a| a.oid().into()).collect();
                let plan = client.prepare_mut(sql, &oids)?.keep();
                plans.push((sql, plan));
                plans.len() - 1
            }
        };
        let table = client.update(&plans[position].1, None, args)?;
        read(table)
    })
}

/// What `EXTENSION_STATE` said (version, table oid), for which extension oid, and when.
struct ExtensionState {
    oid: pg_sys::Oid,
    version: Option<String>,
    relid: Option<i64>,
    read_at: Instant,
}

thread_local! {
    static EXTENSION: RefCell<Option<ExtensionState>> = const { RefCell::new(None) };
}

/// How long what `EXTENSION_STATE` said is trusted while the extension's oid stays the same
/// (an `ALTER EXTENSION UPDATE` keeps the oid).
const EXTENSION_RECHECK: Duration = Duration::from_secs(5);

/// Checks the extension and, when it is there, takes the table lock the batch needs without
/// waiting for it. Cheap on the common path: one catalog index lookup, the lock, a cache probe.
pub fn schema() -> SpiResult<Schema> {
    let oid = unsafe { pg_sys::get_extension_oid(c"pg_outbox".as_ptr(), true) };
    if oid == pg_sys::InvalidOid {
        EXTENSION.with(|e| *e.borrow_mut() = None);
        return Ok(Schema::Missing);
    }
    let cached = EXTENSION.with(|e| {
        e.borrow()
            .as_ref()
            .filter(|s| s.oid == oid && s.read_at.elapsed() < EXTENSION_RECHECK)
            .map(|s| (s.version.clone(), s.relid))
    });
    let (version, relid) = match cached {
        Some(state) => state,
        None => {
            let state = Spi::connect_mut(|c| {
                run(c, EXTENSION_STATE, &[], |t| {
                    if t.is_empty() {
                        Ok((None, None))
                    } else {
                        let row = t.first();
                        Ok((row.get::<String>(1)?, row.get::<i64>(2)?))
                    }
                })
            })?;
            EXTENSION.with(|e| {
                *e.borrow_mut() = Some(ExtensionState {
                    oid,
                    version: state.0.clone(),
                    relid: state.1,
                    read_at: Instant::now(),
                })
            });
            state
        }
    };
    let (Some(version), Some(relid)) = (version, relid) else {
        return Ok(Schema::Missing);
    };
    if version != SCHEMA_VERSION {
        return Ok(Schema::OtherVersion(version));
    }
    let relid = pg_sys::Oid::from(relid as u32);
    unsafe {
        if !pg_sys::ConditionalLockRelationOid(relid, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE) {
            return Ok(Schema::Busy);
        }
        // The table may have been dropped meanwhile: look again under lock.
        let exists = pg_sys::SearchSysCacheExists(
            pg_sys::SysCacheIdentifier::RELOID as i32,
            relid.into(),
            0.into(),
            0.into(),
            0.into(),
        );
        if !exists {
            EXTENSION.with(|e| *e.borrow_mut() = None);
        }
        Ok(if exists { Schema::Ready } else { Schema::Missing })
    }
}

/// Up to `limit` publishable rows above `floor`, in row order, leaving out those for which
/// `handed_over` is true.
pub fn read_batch(
    limit: usize,
    floor: i64,
    handed_over: impl Fn(i64) -> bool,
    skip_at_most: usize,
) -> SpiResult<Vec<OutboxMessage>> {
    Spi::connect_mut(|c| {
        let ids: Vec<i64> =
            run(c, SELECT_CANDIDATES, &[((limit + skip_at_most) as i64).into(), floor.into()], |t| {
                let mut ids = Vec::with_capacity(t.len());
                for row in t {
                    let id = row.get::<i64>(1)?.unwrap_or_default();
                    if !handed_over(id) {
                        ids.push(id);
                    }
                }
                Ok(ids)
            })?;
        let ids: Vec<i64> = ids.into_iter().take(limit).collect();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        run(c, SELECT_ROWS, &[ids.into()], |table| {
            let mut batch = Vec::with_capacity(table.len());
            for row in table {
                batch.push(OutboxMessage {
                    row_id: row.get::<i64>(1)?.unwrap_or_default(),
                    message_id: row.get::<String>(2)?.unwrap_or_default(),
                    event_type: row.get::<String>(3)?.unwrap_or_default(),
                    body: row.get::<String>(4)?.unwrap_or_default().into_bytes(),
                    aggregate_type: row.get::<String>(5)?,
                    aggregate_id: row.get::<String>(6)?,
                    headers: row.get::<String>(7)?,
                    routing_key: row.get::<String>(8)?,
                    exchange: row.get::<String>(9)?,
                    created_at_unix: row.get::<i64>(10)?.unwrap_or_default().max(0) as u64,
                    attempts: row.get::<i32>(11)?.unwrap_or_default(),
                });
            }
            Ok(batch)
        })
    })
}

/// Records what the broker said: deletes the confirmed rows, counts failed attempts and moves
/// exhausted events to the dead letters.
pub fn record_outcomes(published: &[i64], failures: &[Failure]) -> SpiResult<()> {
    if !published.is_empty() {
        Spi::connect_mut(|c| run(c, DELETE_PUBLISHED, &[published.to_vec().into()], |_| Ok(())))?;
    }
    if failures.is_empty() {
        return Ok(());
    }
    record_failures(failures)
}

fn record_failures(failures: &[Failure]) -> SpiResult<()> {
    let (retries, dead): (Vec<&Failure>, Vec<&Failure>) =
        failures.iter().partition(|f| f.retry_after.is_some());
    Spi::connect_mut(|c| {
        if !retries.is_empty() {
            let ids: Vec<i64> = retries.iter().map(|f| f.row_id).collect();
            let delays: Vec<i64> =
                retries.iter().map(|f| f.retry_after.unwrap_or_default().as_millis() as i64).collect();
            let errors: Vec<String> = retries.iter().map(|f| f.error.clone()).collect();
            run(c, RECORD_FAILURES, &[ids.into(), delays.into(), errors.into()], |_| Ok(()))?;
        }
        if !dead.is_empty() {
            let ids: Vec<i64> = dead.iter().map(|f| f.row_id).collect();
            let errors: Vec<String> = dead.iter().map(|f| f.error.clone()).collect();
            run(c, DEAD_LETTER, &[ids.into(), errors.into()], |_| Ok(()))?;
        }
        Ok(())
    })
}

/// A point from which the floor may later advance: (last row id handed out, the next
/// transaction id to be assigned, read after it). Once every transaction below that id has
/// ended, no row at or below that row id can still appear: `outbox.publish` assigns the
/// transaction id before the row id. (Neither a snapshot's xmax, which only bounds the
/// transactions that have *ended*, nor this transaction's own id, which it may have taken
/// before the sequence was read, would do.)
pub fn floor_candidate() -> SpiResult<(i64, i64)> {
    Spi::connect_mut(|c| {
        let last_id = run(c, LAST_ID, &[], |t| t.first().get::<i64>(1))?.unwrap_or(0);
        // Read after the sequence, so above every writer that holds one of its ids.
        let next_xid = unsafe { pg_sys::ReadNextFullTransactionId() }.value as i64;
        Ok((last_id, next_xid))
    })
}

/// The new floor once the transactions of `candidate` have all ended, or `None` while some
/// still run.
pub fn advance_floor(floor: i64, candidate: (i64, i64)) -> SpiResult<Option<i64>> {
    Spi::connect_mut(|c| {
        let xmin = run(c, SNAPSHOT_XMIN, &[], |t| t.first().get::<i64>(1))?.unwrap_or(0);
        if xmin < candidate.1 {
            return Ok(None);
        }
        let lowest =
            run(c, LOWEST_ROW_UP_TO, &[floor.into(), candidate.0.into()], |t| t.first().get::<i64>(1))?;
        Ok(Some(match lowest {
            Some(id) => (id - 1).max(floor),
            None => candidate.0.max(floor),
        }))
    })
}

/// Truncates the outbox when it is empty but its files are larger than `min_bytes`, so that
/// a drained backlog gives its space back at once. Only if nobody else uses the table right
/// now (a conditional lock, never a wait). Returns whether it truncated.
pub fn truncate_if_empty(min_bytes: i64) -> SpiResult<bool> {
    Spi::connect_mut(|c| {
        let bytes = run(c, OUTBOX_BYTES, &[], |t| t.first().get::<i64>(1))?.unwrap_or(0);
        if bytes < min_bytes {
            return Ok(false);
        }
        let relid =
            run(c, "SELECT 'outbox.messages'::regclass::oid::int8", &[], |t| t.first().get::<i64>(1))?
                .unwrap_or(0);
        let locked = unsafe {
            pg_sys::ConditionalLockRelationOid(
                pg_sys::Oid::from(relid as u32),
                pg_sys::AccessExclusiveLock as pg_sys::LOCKMODE,
            )
        };
        if !locked || run(c, ANY_ROW, &[], |t| t.first().get::<bool>(1))?.unwrap_or(true) {
            return Ok(false);
        }
        c.update(TRUNCATE, None, &[])?;
        Ok(true)
    })
}

/// How long until the earliest retry is due (zero if one is due now); `None` if none waits.
pub fn next_retry_in() -> SpiResult<Option<Duration>> {
    let ms = Spi::connect_mut(|c| run(c, NEXT_RETRY_IN, &[], |t| t.first().get::<i64>(1)))?;
    Ok(ms.map(|ms| Duration::from_millis(ms.max(0) as u64)))
}

/// The worker's own session settings: its bookkeeping commits need not wait for a flush (a
/// lost delete only means a duplicate); it must never hang on a lock; and each statement sees
/// the latest commits (the floor depends on it).
pub fn configure_session() -> SpiResult<()> {
    Spi::run(
        "SELECT set_config('synchronous_commit', 'off', false), \
                set_config('lock_timeout', '10s', false), \
                set_config('statement_timeout', '5min', false), \
                set_config('default_transaction_isolation', 'read committed', false), \
                set_config('application_name', 'pg_outbox worker', false)",
    )
}
