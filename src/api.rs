//! `outbox.publish`: validates an event and writes it to `outbox.messages` in the caller's
//! transaction. `outbox.process_transaction` (sql/api.sql) is a procedure over it.
//!
//! A plain V1 C function rather than `#[pg_extern]`: the payload and headers arrive as raw
//! jsonb and are only turned into text (for the size check and header validation), never
//! parsed into a Rust value, which keeps the write path close to a bare INSERT.

use crate::{gucs, wakeup};
use pg_outbox_core::ordering::{aggregate_lock_key, AggregateLock, TransactionLocks};
use pg_outbox_core::validate::{check_event, ErrorClass, EventArgs, InvalidEvent};
use pgrx::datum::DatumWithOid;
use pgrx::fcinfo::{pg_getarg, pg_getarg_datum};
use pgrx::prelude::*;
use pgrx::spi::OwnedPreparedStatement;
use pgrx::{direct_function_call, PgSqlErrorCode};
use std::cell::RefCell;
use std::ffi::CStr;

const INSERT_EVENT: &str = "INSERT INTO outbox.messages \
    (message_id, event_type, payload, aggregate_type, aggregate_id, headers, routing_key, exchange) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";

/// Distinguishes our advisory locks from those of `pg_advisory_xact_lock`, which use 1 and 2
/// in this field: `pg_locks.objsubid` shows 3 for an aggregate lock, 4 for a bucket lock.
const AGGREGATE_LOCK_FIELD4: u16 = 3;
const BUCKET_LOCK_FIELD4: u16 = 4;

thread_local! {
    static INSERT_PLAN: RefCell<Option<OwnedPreparedStatement>> = const { RefCell::new(None) };
    static LOCKS: RefCell<TransactionLocks> = RefCell::new(TransactionLocks::default());
}

/// Called when a transaction ends: its locks are gone.
pub fn transaction_ended() {
    LOCKS.with(|l| l.borrow_mut().reset());
}

#[no_mangle]
pub extern "C" fn pg_finfo_outbox_publish() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// `outbox.publish(event_type, payload, aggregate_type, aggregate_id, headers, routing_key,
/// exchange) RETURNS uuid`; declared in sql/api.sql.
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn outbox_publish(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    let event_type: Option<&str> = pg_getarg(fcinfo, 0);
    let payload = pg_getarg_datum(fcinfo, 1);
    let aggregate_type: Option<&str> = pg_getarg(fcinfo, 2);
    let aggregate_id: Option<&str> = pg_getarg(fcinfo, 3);
    let headers = pg_getarg_datum(fcinfo, 4);
    let routing_key: Option<&str> = pg_getarg(fcinfo, 5);
    let exchange: Option<&str> = pg_getarg(fcinfo, 6);

    let payload_text = payload.map(jsonb_text);
    let headers_text = headers.map(jsonb_text);
    let args = EventArgs {
        event_type,
        payload_bytes: payload_text.as_ref().map(|t| t.to_bytes().len()),
        aggregate_type,
        aggregate_id,
        headers: headers_text.as_ref().map(|t| t.to_str().expect("jsonb text is UTF-8")),
        routing_key,
        exchange,
    };
    if let Err(e) = check_event(&args, gucs::max_payload_bytes()) {
        raise(e);
    }

    if let Some(id) = aggregate_id {
        lock_aggregate(aggregate_lock_key(aggregate_type, id));
    }
    // Assign the transaction id before the row id (a sequence value). The worker relies on
    // it: every transaction holding an id is visible in snapshots from then on.
    pg_sys::GetTopTransactionId();

    let message_id = pgrx::Uuid::from_bytes(new_message_id());
    let jsonb = |d: Option<pg_sys::Datum>| match d {
        Some(d) => DatumWithOid::new(d, pg_sys::JSONBOID),
        None => DatumWithOid::null_oid(pg_sys::JSONBOID),
    };
    let params = [
        message_id.into(),
        event_type.into(),
        jsonb(payload),
        aggregate_type.into(),
        aggregate_id.into(),
        jsonb(headers),
        routing_key.into(),
        exchange.into(),
    ];
    INSERT_PLAN.with(|plan| {
        Spi::connect_mut(|client| {
            let mut plan = plan.borrow_mut();
            if plan.is_none() {
                let oids = params.iter().map(|p| p.oid().into()).collect::<Vec<_>>();
                *plan =
                    Some(client.prepare_mut(INSERT_EVENT, &oids).unwrap_or_else(|e| spi_failed(e)).keep());
            }
            client
                .update(plan.as_ref().expect("prepared above"), None, &params)
                .unwrap_or_else(|e| spi_failed(e));
        })
    });
    wakeup::event_written();
    message_id.into_datum().expect("a uuid is never null")
}

#[no_mangle]
pub extern "C" fn pg_finfo_outbox_lock_aggregate() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// `outbox.lock_aggregate(aggregate_type, aggregate_id)`: the lock `publish` takes, for SQL
/// that writes events another way (replaying dead letters). No-op without an aggregate id.
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn outbox_lock_aggregate(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    let aggregate_type: Option<&str> = pg_getarg(fcinfo, 0);
    if let Some(id) = pg_getarg::<&str>(fcinfo, 1) {
        lock_aggregate(aggregate_lock_key(aggregate_type, id));
    }
    pg_sys::Datum::from(0)
}

/// A UUIDv7 (time-ordered) from a per-process CSPRNG seeded once by the OS, so that writing
/// an event costs no system call.
fn new_message_id() -> [u8; 16] {
    use rand::RngCore;
    let millis =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis();
    let mut random = [0u8; 10];
    rand::thread_rng().fill_bytes(&mut random);
    *uuid::Builder::from_unix_timestamp_millis(millis as u64, &random).into_uuid().as_bytes()
}

fn jsonb_text(datum: pg_sys::Datum) -> &'static CStr {
    // Allocated in the function's memory context, freed with it.
    unsafe { direct_function_call::<&CStr>(pg_sys::jsonb_out, &[Some(datum)]) }
        .expect("jsonb_out returns text")
}

/// Blocks until every other transaction that wrote this aggregate has ended; held to our
/// own transaction's end, so the aggregate's events get ids in commit order. See
/// [`TransactionLocks`] for which locks that takes.
unsafe fn lock_aggregate(key: u64) {
    for lock in LOCKS.with(|l| l.borrow_mut().plan(key)) {
        let mut tag: pg_sys::LOCKTAG = std::mem::zeroed();
        tag.locktag_field1 = pg_sys::MyDatabaseId.to_u32();
        tag.locktag_type = pg_sys::LockTagType::LOCKTAG_ADVISORY as u8;
        tag.locktag_lockmethodid = pg_sys::USER_LOCKMETHOD as u8;
        let mode = match lock {
            AggregateLock::Aggregate(key) => {
                tag.locktag_field2 = (key >> 32) as u32;
                tag.locktag_field3 = key as u32;
                tag.locktag_field4 = AGGREGATE_LOCK_FIELD4;
                pg_sys::ExclusiveLock
            }
            AggregateLock::Bucket { bucket, exclusive } => {
                tag.locktag_field3 = bucket;
                tag.locktag_field4 = BUCKET_LOCK_FIELD4;
                if exclusive {
                    pg_sys::ExclusiveLock
                } else {
                    pg_sys::ShareLock
                }
            }
        };
        pg_sys::LockAcquire(&tag, mode as pg_sys::LOCKMODE, false, false);
    }
}

fn spi_failed(e: pgrx::spi::SpiError) -> ! {
    ereport!(
        ERROR,
        PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
        format!("pg_outbox could not write the event: {e}")
    );
}

fn raise(e: InvalidEvent) -> ! {
    let code = match e.class() {
        ErrorClass::NullValue => PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
        ErrorClass::InvalidParameter => PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
        ErrorClass::StringTooLong => PgSqlErrorCode::ERRCODE_STRING_DATA_RIGHT_TRUNCATION,
        ErrorClass::LimitExceeded => PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
    };
    ereport!(ERROR, code, format!("outbox.publish: {e}"));
}
