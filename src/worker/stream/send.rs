//! From rows read to messages on a lane: what cannot be sent is dead-lettered, the rest goes
//! out in publishing-id order once durable.

use super::super::ledger::{Failure, Meter, ReadRow};
use super::super::state::Worker;
use super::lane::Sent;
use super::sql;
use crate::durability;
use pg_outbox_core::outcome::FailureKind;
use pg_outbox_core::stream::{self, Message};
use std::time::Instant;

/// What a lane's transaction found to send.
pub struct ToSend {
    pub exchange: String,
    pub rows: Vec<(u64, ReadRow)>,
}

/// Rows that cannot become stream messages are dead-lettered by the next transaction (their
/// ids stay unused: gaps are fine); the rest go on, per stream, in id order.
pub(super) fn settle_reads(w: &mut Worker<'_>, sends: Vec<(String, Vec<sql::Assigned>)>) -> Vec<ToSend> {
    let mut out = Vec::new();
    for (exchange, rows) in sends {
        let mut ok = Vec::new();
        for a in rows {
            match a.row {
                Ok(row) => ok.push((a.seq, row)),
                Err((row_id, reason)) => w.streams.outcomes.failures.push(Failure {
                    row_id,
                    kind: FailureKind::Invalid,
                    error: format!("the event cannot be read: {reason}"),
                    retry_after: None,
                    meter: Meter { exchange: Some(exchange.clone()), ..Meter::default() },
                }),
            }
        }
        if !ok.is_empty() {
            out.push(ToSend { exchange, rows: ok });
        }
    }
    out
}

/// No event reaches the broker before its transaction, and the transaction that gave it its
/// id, are durable. False: the worker is stopping.
pub(super) fn make_durable(w: &mut Worker<'_>) -> bool {
    let lsn = durability::last_commit_end();
    if !w.settings.wait_for_sync_standbys {
        durability::flush(lsn);
        return true;
    }
    durability::wait_for_sync_standbys(lsn)
}

/// Hands each lane its events, in id order; one that cannot be a stream message is
/// dead-lettered instead (by the next transaction).
pub(super) fn send(w: &mut Worker<'_>, sends: Vec<ToSend>, now: Instant) {
    for ToSend { exchange, rows } in sends {
        let Some(stream) = stream::stream_of(&exchange).map(str::to_string) else { continue };
        let Some(lane) = w.streams.lanes.get_mut(&stream) else { continue };
        let Some(link) = &lane.link else { continue };
        let mut batch: Vec<(u64, Message)> = Vec::with_capacity(rows.len());
        for (seq, row) in rows {
            if seq <= lane.sent_upto {
                continue;
            }
            let meter =
                Meter { exchange: Some(exchange.clone()), committed_at: row.committed_at, settled_at: 0 };
            let encoded = stream::encode(&row.message).map_err(|e| (FailureKind::Invalid, e.to_string())).and_then(|m| {
                if stream::fits_in_frame(&m, stream::DEFAULT_MAX_FRAME_BYTES) {
                    Ok(m)
                } else {
                    let len = stream::encoded_len(&m);
                    let max = stream::DEFAULT_MAX_FRAME_BYTES;
                    Err((FailureKind::TooLarge, format!("the message takes {len} bytes, more than fit in one stream frame ({max} bytes)")))
                }
            });
            match encoded {
                Ok(message) => {
                    batch.push((seq, message));
                    lane.in_flight.insert(seq, Sent { row_id: row.message.row_id, meter });
                }
                Err((kind, error)) => w.streams.outcomes.failures.push(Failure {
                    row_id: row.message.row_id,
                    kind,
                    error,
                    retry_after: None,
                    meter,
                }),
            }
            lane.sent_upto = seq;
        }
        if !batch.is_empty() {
            lane.busy_at = now;
            link.publish(batch);
        }
    }
    w.status.in_flight(w.ledger.in_flight() + w.streams.in_flight());
}
