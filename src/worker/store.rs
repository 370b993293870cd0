//! The worker's SQL: reading a batch, and recording what happened to what it read (which
//! outbox it is looking at is `table`). Everything here runs inside a transaction opened by
//! [`super::txn`], with the worker's pinned `search_path` (`pg_catalog, pg_temp`) and
//! schema-qualified names, so it resolves only the extension's own objects.
//!
//! A batch is read in row order, skipping rows waiting for a retry and every later row of an
//! aggregate that has a row waiting for a retry: an aggregate's events never overtake each
//! other. Both checks use a small partial index that only holds retrying rows.

use super::ledger::{Failure, Outcomes, ReadRow};
use super::table::{self, Generation, Written};
use super::txn::DbError;
use crate::encoding;
use pg_outbox_core::message::OutboxMessage;
use pgrx::datum::DatumWithOid;
use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiTupleTable};
use std::cell::RefCell;
use std::time::Duration;

// The next publishable rows above the floor ($2), in row order; not those for a stream, which
// the stream path sends (`outbox.publish` writes a stream's name into every row bound for one). Payload and headers come as
// stored (maybe still toasted): rows already handed over cost little to skip, and the size of
// the others is known before they are read whole.
const SELECT_BATCH: &str = "\
SELECT m.id, m.xmin, m.message_id::text, m.event_type, m.payload, m.aggregate_type, m.aggregate_id,
       m.headers, m.routing_key, m.exchange,
       CASE WHEN isfinite(m.created_at) THEN extract(epoch FROM m.created_at)::int8 END, m.attempts,
       m.created_at
  FROM outbox.messages m
 WHERE m.id > $2
   AND (m.next_attempt_at IS NULL OR m.next_attempt_at <= now())
   AND (m.exchange IS NULL OR m.exchange NOT LIKE 'stream:%')
   AND NOT EXISTS (SELECT 1 FROM outbox.messages r
                    WHERE r.next_attempt_at IS NOT NULL
                      AND r.next_attempt_at > now()
                      AND r.aggregate_id = m.aggregate_id
                      AND r.aggregate_type IS NOT DISTINCT FROM m.aggregate_type
                      AND r.id < m.id)
 ORDER BY m.id
 LIMIT $1";

const DELETE_PUBLISHED: &str = "DELETE FROM outbox.messages WHERE id = ANY ($1::int8[])";

const RECORD_FAILURES: &str = "\
UPDATE outbox.messages m
   SET attempts = m.attempts + 1,
       next_attempt_at = now() + f.delay_ms * interval '1 millisecond',
       last_error = f.error
  FROM unnest($1::int8[], $2::float8[], $3::text[]) AS f(id, delay_ms, error)
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

const OUTBOX_BYTES: &str =
    "SELECT pg_relation_size('outbox.messages'::regclass) + pg_indexes_size('outbox.messages'::regclass)";
// By index, like everything the worker reads (its session plans no sequential scans).
const ANY_ROW: &str = "SELECT EXISTS (SELECT 1 FROM outbox.messages ORDER BY id LIMIT 1)";
const TRUNCATE: &str = "TRUNCATE outbox.messages";

// The partial index holds exactly the retrying rows: counting them is as cheap as the minimum.
// (A row for a stream written before 0.4.0 may still carry a retry time: the stream path sends
// it without waiting, and it must not make the worker wake for it.)
const NEXT_RETRY_IN: &str = "\
SELECT (extract(epoch FROM min(next_attempt_at) FILTER (WHERE isfinite(next_attempt_at)) - now()) * 1000)::int8,
       count(*)
  FROM outbox.messages WHERE next_attempt_at IS NOT NULL AND (exchange IS NULL OR exchange NOT LIKE 'stream:%')";

thread_local! {
    static PLANS: RefCell<Vec<(&'static str, OwnedPreparedStatement)>> = const { RefCell::new(Vec::new()) };
}

/// Runs `sql` with a plan prepared once per worker and kept for its life (plans revalidate
/// themselves when the extension is dropped and created again; the worker's session plans
/// every execution afresh, see `session`).
pub(super) fn run<T>(
    client: &mut SpiClient<'_>,
    sql: &'static str,
    args: &[DatumWithOid],
    read: impl FnOnce(SpiTupleTable<'_>) -> Result<T, DbError>,
) -> Result<T, DbError> {
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

/// A batch as read.
#[derive(Debug, Default)]
pub struct Batch {
    /// Publishable rows, in row order, with their size in bytes and commit time.
    pub messages: Vec<ReadRow>,
    /// Rows that cannot become a message (their text cannot be turned into UTF-8): row id,
    /// failed attempts so far, why.
    pub unreadable: Vec<(i64, i32, String)>,
    /// Whether the read stopped at its row or byte limit (more may be waiting).
    pub full: bool,
    /// The transactions that wrote the rows taken, each once.
    pub xmins: Vec<u32>,
    /// How far the WAL must be flushed before the rows go out (set by the round).
    pub commit_lsn: u64,
}

/// What to read: at most `rows` rows and about `bytes` bytes above `floor`, skipping rows for
/// which `handed_over` is true (at most `skip` of them).
pub struct ReadLimits<'a> {
    pub rows: usize,
    pub bytes: usize,
    pub floor: i64,
    pub skip: usize,
    pub handed_over: &'a dyn Fn(i64) -> bool,
}

pub fn read_batch(limits: &ReadLimits<'_>) -> Result<Batch, DbError> {
    Spi::connect_mut(|c| {
        let fetch = (limits.rows + limits.skip) as i64;
        run(c, SELECT_BATCH, &[fetch.into(), limits.floor.into()], |mut t| {
            let mut batch = Batch::default();
            let mut bytes = 0usize;
            while t.next().is_some() {
                let row_id = t.get::<i64>(1)?.unwrap_or_default();
                if (limits.handed_over)(row_id) {
                    continue;
                }
                if batch.messages.len() + batch.unreadable.len() >= limits.rows {
                    batch.full = true;
                    break;
                }
                let size = stored_size(&t, 5)? + stored_size(&t, 8)?;
                if bytes > 0 && bytes + size > limits.bytes {
                    batch.full = true;
                    break;
                }
                bytes += size;
                let attempts = t.get::<i32>(12)?.unwrap_or_default();
                let xmin = t.get_datum_by_ordinal(2)?.map(|d| d.value() as u32).unwrap_or(0);
                if batch.xmins.last() != Some(&xmin) {
                    batch.xmins.push(xmin);
                }
                // When the row's transaction committed, else when it was inserted (see
                // `commit_times`).
                let committed_at = crate::commit_times::lookup(xmin)
                    .or_else(|| t.get_datum_by_ordinal(13).ok().flatten().map(|d| d.value() as i64))
                    .unwrap_or_default();
                match read_message(&t, row_id, attempts) {
                    Ok(message) => batch.messages.push(ReadRow { message, bytes: size, committed_at }),
                    Err(reason) => batch.unreadable.push((row_id, attempts, reason)),
                }
            }
            Ok(batch)
        })
    })
}

/// Bytes of a column's value once detoasted and decompressed, read from its header only.
pub(super) fn stored_size(t: &SpiTupleTable<'_>, ordinal: usize) -> Result<usize, DbError> {
    Ok(match t.get_datum_by_ordinal(ordinal)? {
        // SAFETY: a varlena datum of the current row; only its header is read.
        Some(d) => unsafe { pg_sys::toast_raw_datum_size(d) },
        None => 0,
    })
}

/// The current row as a message; why not, if one of its texts cannot be read as UTF-8. An
/// error that is not about the value itself (see [`utf8_text`]) is raised again, naming the
/// row, and fails the round.
pub(super) fn read_message(
    t: &SpiTupleTable<'_>,
    row_id: i64,
    attempts: i32,
) -> Result<OutboxMessage, String> {
    let read = |ordinal: usize, what: &str, jsonb: bool| -> Result<Option<String>, String> {
        let datum = t.get_datum_by_ordinal(ordinal).map_err(|e| e.to_string())?;
        datum
            .map(|d| match utf8_text(d, jsonb) {
                Ok(text) => Ok(text),
                Err(ValueError::Own(e)) => Err(format!("{what}: {e}")),
                Err(ValueError::Other(e)) => {
                    let message = format!("reading the {what} of outbox row {row_id}: {}", e.message);
                    pgrx::ereport!(ERROR, e.code, message);
                }
            })
            .transpose()
    };
    let text = |ordinal: usize, what: &str| read(ordinal, what, false);
    let json = |ordinal: usize, what: &str| read(ordinal, what, true);
    Ok(OutboxMessage {
        row_id,
        message_id: text(3, "message_id")?.unwrap_or_default(),
        event_type: text(4, "event_type")?.unwrap_or_default(),
        body: json(5, "payload")?.unwrap_or_default().into_bytes(),
        aggregate_type: text(6, "aggregate_type")?,
        aggregate_id: text(7, "aggregate_id")?,
        headers: json(8, "headers")?,
        routing_key: text(9, "routing_key")?,
        exchange: text(10, "exchange")?,
        created_at_unix: t.get::<i64>(11).map_err(|e| e.to_string())?.unwrap_or_default().max(0) as u64,
        attempts,
    })
}

/// Why a value could not be read.
enum ValueError {
    /// The value's own: converting it again would fail again. Its row is dead-lettered.
    Own(String),
    /// Anything else: says nothing about the row.
    Other(DbError),
}

/// A text (or, with `jsonb`, a jsonb value's text) as UTF-8. A data error of one value (class
/// 22: it cannot be converted; class 54: it is too long to convert) is that row's problem only,
/// and the row is dead-lettered. Any other error (a cancel, a statement timeout, out of memory,
/// an I/O error reading its TOAST) says nothing about the row: it fails the round, which is
/// tried again after a pause, so that an event the broker may already hold is never
/// dead-lettered for it.
fn utf8_text(datum: pg_sys::Datum, jsonb: bool) -> Result<String, ValueError> {
    PgTryBuilder::new(|| {
        let bytes: &[u8] = if jsonb {
            // SAFETY: a jsonb datum; jsonb_out returns its text in the current memory context.
            unsafe { pgrx::direct_function_call::<&std::ffi::CStr>(pg_sys::jsonb_out, &[Some(datum)]) }
                .map(|t| t.to_bytes())
                .unwrap_or_default()
        } else {
            // SAFETY: a text datum of the current row.
            unsafe { encoding::varlena_bytes(datum) }
        };
        encoding::to_utf8(bytes).map(|s| s.into_owned()).map_err(|e| ValueError::Own(e.0))
    })
    .catch_others(|e| {
        let (report, panicked) = match &e {
            CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) => (r, false),
            CaughtError::RustPanic { ereport, .. } => (ereport, true),
        };
        let error = DbError::new(report.sql_error_code(), report.message());
        Err(if is_the_values_own(&error) && !panicked {
            ValueError::Own(error.message)
        } else {
            ValueError::Other(error)
        })
    })
    .execute()
}

/// Whether an error converting one value is about that value: a data exception (class 22) or
/// a program limit (class 54), which converting it again would raise again.
fn is_the_values_own(error: &DbError) -> bool {
    matches!(&error.sqlstate()[..2], "22" | "54")
}

/// Records what the broker said: deletes the confirmed rows, counts failed attempts and moves
/// exhausted events to the dead letters.
pub fn record_outcomes(outcomes: &Outcomes) -> Result<(), DbError> {
    if !outcomes.confirmed.is_empty() {
        Spi::connect_mut(|c| run(c, DELETE_PUBLISHED, &[outcomes.confirmed.clone().into()], |_| Ok(())))?;
    }
    if outcomes.failures.is_empty() {
        return Ok(());
    }
    let (retries, dead): (Vec<&Failure>, Vec<&Failure>) =
        outcomes.failures.iter().partition(|f| f.retry_after.is_some());
    Spi::connect_mut(|c| {
        if !retries.is_empty() {
            let ids: Vec<i64> = retries.iter().map(|f| f.row_id).collect();
            let delays: Vec<f64> =
                retries.iter().map(|f| f.retry_after.unwrap_or_default().as_secs_f64() * 1000.0).collect();
            run(c, RECORD_FAILURES, &[ids.into(), delays.into(), errors(&retries)], |_| Ok(()))?;
        }
        if !dead.is_empty() {
            table::lock_to_write(Written::DeadLetters)?;
            let ids: Vec<i64> = dead.iter().map(|f| f.row_id).collect();
            run(c, DEAD_LETTER, &[ids.into(), errors(&dead)], |_| Ok(()))?;
        }
        Ok(())
    })
}

/// A text[] of the failures' errors, in the database's encoding.
fn errors(failures: &[&Failure]) -> DatumWithOid<'static> {
    let mut texts: Vec<pg_sys::Datum> =
        failures.iter().map(|f| encoding::diagnostic_text(&f.error)).collect();
    // SAFETY: builds a one-dimensional text[] (varlena elements: length -1, not by value,
    // int alignment) from text datums made in the current memory context.
    unsafe {
        let array = pg_sys::construct_array(
            texts.as_mut_ptr(),
            texts.len() as i32,
            pg_sys::TEXTOID,
            -1,
            false,
            pg_sys::TYPALIGN_INT as std::ffi::c_char,
        );
        DatumWithOid::new(pg_sys::Datum::from(array), pg_sys::TEXTARRAYOID)
    }
}

/// Truncates the outbox when it is empty but its files are larger than `min_bytes`, so that
/// a drained backlog gives its space back at once. Only if nobody else uses the table right
/// now (a conditional lock, never a wait). Returns whether it truncated.
pub fn truncate_if_empty(generation: Generation, min_bytes: i64) -> Result<bool, DbError> {
    Spi::connect_mut(|c| {
        let bytes = run(c, OUTBOX_BYTES, &[], |t| Ok(t.first().get::<i64>(1)?))?.unwrap_or(0);
        if bytes < min_bytes {
            return Ok(false);
        }
        // SAFETY: a conditional lock inside a transaction, released at its end.
        let locked = unsafe {
            pg_sys::ConditionalLockRelationOid(
                pg_sys::Oid::from(generation.relid),
                pg_sys::AccessExclusiveLock as pg_sys::LOCKMODE,
            )
        };
        if !locked || run(c, ANY_ROW, &[], |t| Ok(t.first().get::<bool>(1)?))?.unwrap_or(true) {
            return Ok(false);
        }
        c.update(TRUNCATE, None, &[])?;
        Ok(true)
    })
}

/// How long until the earliest retry is due (zero if one is due now; `None` if none waits),
/// and how many rows wait for a retry.
pub fn next_retry_in() -> Result<(Option<Duration>, i64), DbError> {
    let (ms, retrying) = Spi::connect_mut(|c| {
        run(c, NEXT_RETRY_IN, &[], |t| {
            let row = t.first();
            Ok((row.get::<i64>(1)?, row.get::<i64>(2)?.unwrap_or_default()))
        })
    })?;
    Ok((ms.map(|ms| Duration::from_millis(ms.max(0) as u64)), retrying))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_data_errors_are_a_values_own() {
        use PgSqlErrorCode::*;
        for own in [
            ERRCODE_UNTRANSLATABLE_CHARACTER,
            ERRCODE_CHARACTER_NOT_IN_REPERTOIRE,
            ERRCODE_PROGRAM_LIMIT_EXCEEDED,
        ] {
            assert!(is_the_values_own(&DbError::new(own, "x")), "{own:?}");
        }
        for not_own in [
            ERRCODE_QUERY_CANCELED,
            ERRCODE_OUT_OF_MEMORY,
            ERRCODE_INTERNAL_ERROR,
            ERRCODE_DATA_CORRUPTED,
            ERRCODE_IO_ERROR,
        ] {
            assert!(!is_the_values_own(&DbError::new(not_own, "x")), "{not_own:?}");
        }
    }
}
