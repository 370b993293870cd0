//! The stream path's SQL. Like everything the worker runs: inside a transaction opened by
//! `txn`, with the pinned `search_path`, schema-qualified names, and plans kept per worker
//! (`store::run`).

use super::super::ledger::ReadRow;
use super::super::store::{self, run};
use super::super::txn::DbError;
use pgrx::prelude::*;

/// Stream events without a publishing id yet, in row order, with the stream they go to (rows
/// that name no exchange go to `outbox.exchange`, `$1`), skipping streams in `$3` (not
/// connected). Custom plans: with `$1` not a stream, this reads the partial index only.
const UNASSIGNED: &str = "\
SELECT m.id, coalesce(m.exchange, $1)
  FROM outbox.messages m
 WHERE m.stream_seq IS NULL
   AND m.id > $2
   AND (m.exchange LIKE 'stream:%' OR (m.exchange IS NULL AND $1 LIKE 'stream:%'))
   AND coalesce(m.exchange, $1) <> ALL ($3::text[])
 ORDER BY m.id
 LIMIT $4";

const DATABASE: &str = "SELECT pg_catalog.current_database()::text";

/// Takes `$2` ids for stream `$1`; the new ones are `last_seq - $2 + 1 ..= last_seq`.
const TAKE_IDS: &str = "\
UPDATE outbox.stream_producers SET last_seq = last_seq + $2 WHERE stream = $1 RETURNING last_seq";

/// Gives rows their ids, and names their stream (a row that named none keeps going to the
/// stream it was given an id for, whatever `outbox.exchange` becomes).
const ASSIGN: &str = "\
UPDATE outbox.messages m
   SET stream_seq = a.seq, exchange = $3
  FROM unnest($1::int8[], $2::int8[]) AS a(id, seq)
 WHERE m.id = a.id AND m.stream_seq IS NULL";

/// After a (re)connect: ids are never below what the broker stored for the producer.
const RECOVER_PRODUCER: &str = "\
INSERT INTO outbox.stream_producers AS p (stream, last_seq) VALUES ($1, $2)
ON CONFLICT (stream) DO UPDATE SET last_seq = greatest(p.last_seq, excluded.last_seq)";

/// After a (re)connect: the events at or below the broker's last stored id are in the stream.
const DELETE_STORED: &str = "\
DELETE FROM outbox.messages WHERE exchange = $1 AND stream_seq IS NOT NULL AND stream_seq <= $2
RETURNING id, created_at";

/// The stream's events that have an id above `$2`, in id order: the order they are sent in.
const ASSIGNED: &str = "\
SELECT m.id, m.xmin, m.message_id::text, m.event_type, m.payload, m.aggregate_type, m.aggregate_id,
       m.headers, m.routing_key, m.exchange,
       CASE WHEN isfinite(m.created_at) THEN extract(epoch FROM m.created_at)::int8 END, m.attempts,
       m.created_at, m.stream_seq
  FROM outbox.messages m
 WHERE m.exchange = $1 AND m.stream_seq IS NOT NULL AND m.stream_seq > $2
 ORDER BY m.stream_seq
 LIMIT $3";

/// The database's name.
pub fn database() -> Result<String, DbError> {
    Spi::connect_mut(|c| run(c, DATABASE, &[], |t| Ok(t.first().get::<String>(1)?.unwrap_or_default())))
}

/// Up to `limit` stream events without an id above `floor`, in row order: (row id, exchange).
pub fn unassigned(
    default_exchange: &str,
    floor: i64,
    skip: &[String],
    limit: usize,
) -> Result<Vec<(i64, String)>, DbError> {
    let args = [default_exchange.into(), floor.into(), skip.to_vec().into(), (limit as i64).into()];
    Spi::connect_mut(|c| {
        run(c, UNASSIGNED, &args, |t| {
            let mut rows = Vec::new();
            for row in t {
                if let (Some(id), Some(exchange)) = (row.get::<i64>(1)?, row.get::<String>(2)?) {
                    rows.push((id, exchange));
                }
            }
            Ok(rows)
        })
    })
}

/// Gives `rows` (in the order given) the next ids of `stream` (its exchange is
/// `stream:<name>`), recorded in the same transaction.
pub fn assign(stream: &str, exchange: &str, rows: &[i64]) -> Result<(), DbError> {
    if rows.is_empty() {
        return Ok(());
    }
    Spi::connect_mut(|c| {
        let n = rows.len() as i64;
        let last = run(c, TAKE_IDS, &[stream.into(), n.into()], |t| Ok(t.first().get::<i64>(1)?))?
            .ok_or_else(|| {
                DbError::new(PgSqlErrorCode::ERRCODE_NO_DATA_FOUND, "no producer row for the stream")
            })?;
        let seqs: Vec<i64> = (last - n + 1..=last).collect();
        run(c, ASSIGN, &[rows.to_vec().into(), seqs.into(), exchange.into()], |_| Ok(()))
    })
}

/// After a (re)connect whose producer the broker knows up to `stored`: ids go on above it,
/// and the events at or below it are deleted (they are in the stream). Returns the deleted
/// rows' creation times (Postgres timestamps), for the metrics.
pub fn recover(stream: &str, exchange: &str, stored: u64) -> Result<Vec<i64>, DbError> {
    let stored = stored.min(i64::MAX as u64) as i64;
    Spi::connect_mut(|c| {
        run(c, RECOVER_PRODUCER, &[stream.into(), stored.into()], |_| Ok(()))?;
        run(c, DELETE_STORED, &[exchange.into(), stored.into()], |mut t| {
            let mut created = Vec::new();
            while t.next().is_some() {
                created.push(t.get_datum_by_ordinal(2)?.map(|d| d.value() as i64).unwrap_or_default());
            }
            Ok(created)
        })
    })
}

/// An event as read for sending: its id, the row, or why it cannot be sent.
pub struct Assigned {
    pub seq: u64,
    pub row: Result<ReadRow, (i64, String)>,
}

/// The stream's events with an id above `after`, at most `limit`, in id order.
pub fn assigned(exchange: &str, after: u64, limit: usize) -> Result<Vec<Assigned>, DbError> {
    let after = after.min(i64::MAX as u64) as i64;
    Spi::connect_mut(|c| {
        run(c, ASSIGNED, &[exchange.into(), after.into(), (limit as i64).into()], |mut t| {
            let mut rows = Vec::new();
            while t.next().is_some() {
                let row_id = t.get::<i64>(1)?.unwrap_or_default();
                let seq = t.get::<i64>(14)?.unwrap_or_default().max(0) as u64;
                let xmin = t.get_datum_by_ordinal(2)?.map(|d| d.value() as u32).unwrap_or(0);
                let attempts = t.get::<i32>(12)?.unwrap_or_default();
                let bytes = store::stored_size(&t, 5)? + store::stored_size(&t, 8)?;
                let committed_at = crate::commit_times::lookup(xmin)
                    .or_else(|| t.get_datum_by_ordinal(13).ok().flatten().map(|d| d.value() as i64))
                    .unwrap_or_default();
                let row = store::read_message(&t, row_id, attempts)
                    .map(|message| ReadRow { message, bytes, committed_at })
                    .map_err(|reason| (row_id, reason));
                rows.push(Assigned { seq, row });
            }
            Ok(rows)
        })
    })
}
