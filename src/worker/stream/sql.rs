//! The stream path's SQL. Like everything the worker runs: inside a transaction opened by
//! `txn`, with the pinned `search_path`, schema-qualified names, and plans kept per worker
//! (`store::run`). Every statement reads by one of the two partial indexes of sql/stream.sql,
//! so events waiting for one stream cost nothing to the reads of another, or of the AMQP path's.
//!
//! Stream and database names cross as bytes: in a database that is not UTF-8 (LATIN1, say) a
//! name like `stream:café` is stored in the database's encoding, but the broker and the
//! worker's maps know it in UTF-8. Names come out in the database's encoding, unconverted
//! (`convert_to` to that same encoding), and become UTF-8 in the worker as any text it reads
//! ([`encoding::to_utf8`]); they go in as UTF-8, converted by `convert_from`.

use super::super::ledger::ReadRow;
use super::super::store::{self, run};
use super::super::table::{self, Written};
use super::super::txn::DbError;
use crate::encoding;
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;

/// Ids are never reused, even by a link of an earlier install whose last messages the broker may
/// still be reading: a stream first seen (no row yet) starts this far above the broker's id.
const FIRST_GAP: i64 = 1 << 20;

/// The streams that have events without an id (a skip scan: one index probe per stream).
const STREAMS_UNASSIGNED: &str = "\
WITH RECURSIVE s(exchange) AS (
    (SELECT m.exchange FROM outbox.messages m
      WHERE m.exchange LIKE 'stream:%' AND m.stream_seq IS NULL
      ORDER BY m.exchange LIMIT 1)
    UNION ALL
    SELECT (SELECT m.exchange FROM outbox.messages m
             WHERE m.exchange LIKE 'stream:%' AND m.stream_seq IS NULL AND m.exchange > s.exchange
             ORDER BY m.exchange LIMIT 1)
      FROM s WHERE s.exchange IS NOT NULL)
SELECT pg_catalog.convert_to(exchange, pg_catalog.getdatabaseencoding())
  FROM s WHERE exchange IS NOT NULL LIMIT $1";

/// The streams that have events with an id (after a restart, these are sent first).
const STREAMS_ASSIGNED: &str = "\
WITH RECURSIVE s(exchange) AS (
    (SELECT m.exchange FROM outbox.messages m
      WHERE m.stream_seq IS NOT NULL
      ORDER BY m.exchange LIMIT 1)
    UNION ALL
    SELECT (SELECT m.exchange FROM outbox.messages m
             WHERE m.stream_seq IS NOT NULL AND m.exchange > s.exchange
             ORDER BY m.exchange LIMIT 1)
      FROM s WHERE s.exchange IS NOT NULL)
SELECT pg_catalog.convert_to(exchange, pg_catalog.getdatabaseencoding())
  FROM s WHERE exchange IS NOT NULL LIMIT $1";

/// A stream's next events without an id above the floor, in row order (within an aggregate,
/// commit order).
const UNASSIGNED: &str = "\
SELECT m.id FROM outbox.messages m
 WHERE m.exchange = pg_catalog.convert_from($1, 'UTF8') AND m.exchange LIKE 'stream:%'
   AND m.stream_seq IS NULL AND m.id > $2
 ORDER BY m.exchange, m.id
 LIMIT $3";

/// Takes `$2` ids for stream `$1`; the new ones are `last_seq - $2 + 1 ..= last_seq`.
const TAKE_IDS: &str = "\
UPDATE outbox.stream_producers SET last_seq = last_seq + $2
 WHERE stream = pg_catalog.convert_from($1, 'UTF8')
RETURNING last_seq";

/// Gives rows their ids. A row that was waiting for a retry of the AMQP path (written for a
/// `stream:` exchange before 0.4.0) waits no more.
const ASSIGN: &str = "\
UPDATE outbox.messages m
   SET stream_seq = a.seq, next_attempt_at = NULL
  FROM unnest($1::int8[], $2::int8[]) AS a(id, seq)
 WHERE m.id = a.id AND m.stream_seq IS NULL";

/// After a (re)connect: ids go on above what the broker stored for the producer.
const RECOVER_PRODUCER: &str = "\
INSERT INTO outbox.stream_producers AS p (stream, last_seq)
VALUES (pg_catalog.convert_from($1, 'UTF8'), $2 + $3)
ON CONFLICT (stream) DO UPDATE SET last_seq = greatest(p.last_seq, $2)";

/// The stream's events that have an id above `$2`, in id order: the order they are sent in.
const ASSIGNED: &str = "\
SELECT m.id, m.xmin, m.message_id::text, m.event_type, m.payload, m.aggregate_type, m.aggregate_id,
       m.headers, m.routing_key, m.exchange,
       CASE WHEN isfinite(m.created_at) THEN extract(epoch FROM m.created_at)::int8 END, m.attempts,
       m.created_at, m.stream_seq
  FROM outbox.messages m
 WHERE m.exchange = pg_catalog.convert_from($1, 'UTF8') AND m.stream_seq IS NOT NULL
   AND m.stream_seq > $2
 ORDER BY m.exchange, m.stream_seq
 LIMIT $3";

const DATABASE: &str =
    "SELECT pg_catalog.convert_to(pg_catalog.current_database()::text, pg_catalog.getdatabaseencoding())";

/// A name as a parameter: its UTF-8 bytes, which the statement converts to the database's
/// encoding.
fn utf8(name: &str) -> DatumWithOid<'static> {
    name.as_bytes().to_vec().into()
}

/// A name read in the database's encoding, as UTF-8; `None` if it cannot be (only in an
/// `SQL_ASCII` database, for bytes that are not UTF-8).
fn from_database(bytes: &[u8]) -> Option<String> {
    encoding::to_utf8(bytes).ok().map(|name| name.into_owned())
}

/// The database's name (in an `SQL_ASCII` database, bytes that are not UTF-8 become U+FFFD:
/// the producer's name only needs to stay the same).
pub fn database() -> Result<String, DbError> {
    Spi::connect_mut(|c| {
        run(c, DATABASE, &[], |t| {
            let bytes = t.first().get::<Vec<u8>>(1)?.unwrap_or_default();
            Ok(from_database(&bytes).unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned()))
        })
    })
}

/// The exchanges (`stream:<name>`) of the streams that have events waiting, at most `limit` of
/// each kind, sorted and each once.
pub fn streams(limit: usize) -> Result<Vec<String>, DbError> {
    let mut found = Vec::new();
    Spi::connect_mut(|c| {
        for sql in [STREAMS_UNASSIGNED, STREAMS_ASSIGNED] {
            run(c, sql, &[(limit as i64).into()], |t| {
                for row in t {
                    // Only in an `SQL_ASCII` database, and only for a row written around
                    // `outbox.publish` (which refuses such names), can a name not be UTF-8:
                    // no broker could take it, and its events wait.
                    found.extend(row.get::<Vec<u8>>(1)?.and_then(|bytes| from_database(&bytes)));
                }
                Ok(())
            })?;
        }
        Ok::<_, DbError>(())
    })?;
    found.sort();
    found.dedup();
    Ok(found)
}

/// Up to `limit` events of `exchange` without an id, above `floor`, in row order.
pub fn unassigned(exchange: &str, floor: i64, limit: usize) -> Result<Vec<i64>, DbError> {
    let args = [utf8(exchange), floor.into(), (limit as i64).into()];
    Spi::connect_mut(|c| {
        run(c, UNASSIGNED, &args, |t| {
            let mut ids = Vec::new();
            for row in t {
                ids.extend(row.get::<i64>(1)?);
            }
            Ok(ids)
        })
    })
}

/// Gives `rows` (in the order given) the next ids of `stream`, recorded in the same
/// transaction. False: the stream has no producer row (someone removed it), and no id was
/// given: the lane must recover first.
pub fn assign(stream: &str, rows: &[i64]) -> Result<bool, DbError> {
    if rows.is_empty() {
        return Ok(true);
    }
    table::lock_to_write(Written::StreamProducers)?;
    Spi::connect_mut(|c| {
        let n = rows.len() as i64;
        let last = run(c, TAKE_IDS, &[utf8(stream), n.into()], |t| {
            Ok(if t.is_empty() { None } else { t.first().get::<i64>(1)? })
        })?;
        let Some(last) = last else { return Ok(false) };
        let seqs: Vec<i64> = (last - n + 1..=last).collect();
        run(c, ASSIGN, &[rows.to_vec().into(), seqs.into()], |_| Ok(true))
    })
}

/// After a (re)connect whose producer the broker knows up to `stored`: new ids go on above it.
/// (Nothing is deleted on its word: the events that have an id are sent again, and the broker
/// confirms those it has, once they are safe.)
pub fn recover(stream: &str, stored: u64) -> Result<(), DbError> {
    let stored = stored.min((i64::MAX - FIRST_GAP) as u64) as i64;
    table::lock_to_write(Written::StreamProducers)?;
    Spi::connect_mut(|c| {
        run(c, RECOVER_PRODUCER, &[utf8(stream), stored.into(), FIRST_GAP.into()], |_| Ok(()))
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
        run(c, ASSIGNED, &[utf8(exchange), after.into(), (limit as i64).into()], |mut t| {
            let mut rows = Vec::new();
            while t.next().is_some() {
                let row_id = t.get::<i64>(1)?.unwrap_or_default();
                let seq = t.get::<i64>(14)?.unwrap_or_default().max(0) as u64;
                let attempts = t.get::<i32>(12)?.unwrap_or_default();
                let bytes = store::stored_size(&t, 5)? + store::stored_size(&t, 8)?;
                // The row's xmin is the transaction that gave it its id: its insert time is
                // what tells when it was written.
                let committed_at =
                    t.get_datum_by_ordinal(13).ok().flatten().map(|d| d.value() as i64).unwrap_or_default();
                let row = store::read_message(&t, row_id, attempts)
                    .map(|message| ReadRow { message, bytes, committed_at })
                    .map_err(|reason| (row_id, reason));
                rows.push(Assigned { seq, row });
            }
            Ok(rows)
        })
    })
}
