//! `outbox.publish`: validates an event and writes it to `outbox.messages` in the caller's
//! transaction. `outbox.process_transaction` (sql/api.sql) is the same function as a procedure.
//!
//! Plain V1 C functions rather than `#[pg_extern]`: the arguments are taken as the datums they
//! arrive as and handed to the INSERT unchanged, so text in any database encoding is stored
//! exactly as given; only what validation needs is looked at, as UTF-8 (see [`encoding`]).
//!
//! `publish` runs as the extension's owner (SECURITY DEFINER) with the caller's `search_path`.
//! That is safe because its one statement names only schema-qualified objects, takes typed
//! parameters, and uses no operator or function: the caller's `search_path` cannot make it
//! resolve anything of theirs.

use crate::encoding::{self, NotUtf8};
use crate::{aggregate_lock, gucs, shmem, wake};
use pg_outbox_core::locks::aggregate_lock_key;
use pg_outbox_core::stream::PREFIX as STREAM_PREFIX;
use pg_outbox_core::validate::{check_event, ErrorClass, EventArgs, InvalidEvent, Limits};
use pgrx::datum::DatumWithOid;
use pgrx::fcinfo::pg_getarg_datum;
use pgrx::prelude::*;
use pgrx::spi::OwnedPreparedStatement;
use pgrx::{direct_function_call, PgSqlErrorCode};
use std::borrow::Cow;
use std::cell::RefCell;
use std::ffi::CStr;

const INSERT_EVENT: &str = "INSERT INTO outbox.messages \
    (message_id, event_type, payload, aggregate_type, aggregate_id, headers, routing_key, exchange) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";

thread_local! {
    static INSERT_PLAN: RefCell<Option<OwnedPreparedStatement>> = const { RefCell::new(None) };
}

#[no_mangle]
pub extern "C" fn pg_finfo_outbox_publish() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// `outbox.publish(event_type, payload, aggregate_type, aggregate_id, headers, routing_key,
/// exchange) RETURNS uuid`; declared in sql/api.sql.
///
/// # Safety
/// Called by Postgres' function manager with the arguments declared in sql/api.sql.
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn outbox_publish(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: `fcinfo` comes from Postgres with seven arguments (sql/api.sql).
    let arg = |n: usize| unsafe { pg_getarg_datum(fcinfo, n) };
    let (event_type, payload, aggregate_type, aggregate_id, headers, routing_key, exchange) =
        (arg(0), arg(1), arg(2), arg(3), arg(4), arg(5), arg(6));
    let headers = with_ambient_headers(headers);

    let payload_bytes = payload.map(|p| utf8_len(jsonb_text(p)));
    let headers_text = headers.map(|h| utf8_or_raise(jsonb_text(h).to_bytes()).into_owned());
    let text = |d: Option<pg_sys::Datum>| {
        // SAFETY: these arguments are declared text: non-null datums are text values.
        d.map(|d| utf8_or_raise(unsafe { encoding::varlena_bytes(d) }))
    };
    let (event_type_text, aggregate_type_text, aggregate_id_text, routing_key_text, exchange_text) =
        (text(event_type), text(aggregate_type), text(aggregate_id), text(routing_key), text(exchange));
    let args = EventArgs {
        event_type: event_type_text.as_deref(),
        payload_bytes,
        aggregate_type: aggregate_type_text.as_deref(),
        aggregate_id: aggregate_id_text.as_deref(),
        headers: headers_text.as_deref(),
        routing_key: routing_key_text.as_deref(),
        exchange: exchange_text.as_deref(),
    };
    let checked = gucs::with_allowed_exchanges(|exchanges| {
        let limits = Limits {
            max_payload_bytes: gucs::max_payload_bytes(),
            frame_max: shmem::frame_max() as usize,
            exchanges,
        };
        check_event(&args, &limits)
    });
    if let Err(e) = checked {
        raise(e);
    }

    if let Some(id) = args.aggregate_id {
        aggregate_lock::lock(aggregate_lock_key(args.aggregate_type, id));
    }
    // Assign the transaction id before the row id (a sequence value). The worker relies on
    // it: every transaction holding an id is visible in snapshots from then on.
    // SAFETY: we are in a transaction (a function is being called).
    unsafe { pg_sys::GetTopTransactionId() };

    // An event that names no exchange goes to `outbox.exchange`, which the worker reads when it
    // publishes; but a stream is decided now: its events are numbered by the stream they are in.
    let default_stream = exchange.is_none().then(gucs::exchange).filter(|e| e.starts_with(STREAM_PREFIX));
    let message_id = pgrx::Uuid::from_bytes(uuid::Uuid::now_v7().into_bytes());
    let typed = |d: Option<pg_sys::Datum>, oid: pg_sys::Oid| match d {
        // SAFETY: the datum is the argument as Postgres passed it, of this type.
        Some(d) => unsafe { DatumWithOid::new(d, oid) },
        None => DatumWithOid::null_oid(oid),
    };
    let params = [
        message_id.into(),
        typed(event_type, pg_sys::TEXTOID),
        typed(payload, pg_sys::JSONBOID),
        typed(aggregate_type, pg_sys::TEXTOID),
        typed(aggregate_id, pg_sys::TEXTOID),
        typed(headers, pg_sys::JSONBOID),
        typed(routing_key, pg_sys::TEXTOID),
        match default_stream {
            Some(stream) => stream.into(),
            None => typed(exchange, pg_sys::TEXTOID),
        },
    ];
    INSERT_PLAN.with(|plan| {
        Spi::connect_mut(|client| {
            let mut plan = plan.borrow_mut();
            let plan = match plan.as_ref() {
                Some(p) => p,
                None => {
                    let oids = params.iter().map(|p| p.oid().into()).collect::<Vec<_>>();
                    let prepared = client.prepare_mut(INSERT_EVENT, &oids).unwrap_or_else(|e| spi_failed(e));
                    plan.insert(prepared.keep())
                }
            };
            client.update(plan, None, &params).unwrap_or_else(|e| spi_failed(e));
        })
    });
    wake::event_written();
    message_id.into_datum().unwrap_or_else(|| spi_failed(pgrx::spi::SpiError::NoTupleTable))
}

#[no_mangle]
pub extern "C" fn pg_finfo_outbox_lock_aggregate() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// `outbox.lock_aggregate(aggregate_type, aggregate_id)`: the lock `publish` takes, for SQL
/// that writes events another way (replaying dead letters). No-op without an aggregate id.
///
/// # Safety
/// Called by Postgres' function manager with two text arguments.
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn outbox_lock_aggregate(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: two text arguments (sql/api.sql).
    let (aggregate_type, aggregate_id) = unsafe { (pg_getarg_datum(fcinfo, 0), pg_getarg_datum(fcinfo, 1)) };
    // SAFETY: text datums.
    let text = |d: Option<pg_sys::Datum>| d.map(|d| utf8_or_raise(unsafe { encoding::varlena_bytes(d) }));
    if let Some(id) = text(aggregate_id) {
        aggregate_lock::lock(aggregate_lock_key(text(aggregate_type).as_deref(), &id));
    }
    pg_sys::Datum::from(0)
}

/// The event's own headers over those of `outbox.headers` (set by the caller, typically with
/// `SET LOCAL`): an own header wins over an ambient one of the same name. Both are jsonb; the
/// setting was checked to be a JSON object when it was set.
fn with_ambient_headers(own: Option<pg_sys::Datum>) -> Option<pg_sys::Datum> {
    let Some(ambient) = gucs::ambient_headers() else {
        return own;
    };
    // SAFETY: `jsonb_in` parses a NUL-terminated text, alive for the call; the value is
    // allocated in the function's memory context.
    let ambient = unsafe {
        direct_function_call::<pg_sys::Datum>(
            pg_sys::jsonb_in,
            &[Some(pg_sys::Datum::from(ambient.as_ptr()))],
        )
    }?;
    match own {
        None => Some(ambient),
        // SAFETY: two jsonb values; `||` keeps the right-hand member of a name both have.
        Some(own) => unsafe {
            direct_function_call::<pg_sys::Datum>(pg_sys::jsonb_concat, &[Some(ambient), Some(own)])
        },
    }
}

/// The JSON text of a jsonb value, in the database's encoding.
fn jsonb_text(datum: pg_sys::Datum) -> &'static CStr {
    // SAFETY: `datum` is a jsonb value; the text is allocated in the function's memory context
    // and freed with it, after every use here.
    unsafe { direct_function_call::<&CStr>(pg_sys::jsonb_out, &[Some(datum)]) }
        .unwrap_or_else(|| spi_failed(pgrx::spi::SpiError::NoTupleTable))
}

/// Bytes of a text once in UTF-8.
fn utf8_len(text: &CStr) -> usize {
    if encoding::is_utf8_database() {
        text.to_bytes().len()
    } else {
        utf8_or_raise(text.to_bytes()).len()
    }
}

fn utf8_or_raise(bytes: &[u8]) -> Cow<'_, str> {
    encoding::to_utf8(bytes).unwrap_or_else(|NotUtf8(e)| {
        raise_with_hint(
            PgSqlErrorCode::ERRCODE_CHARACTER_NOT_IN_REPERTOIRE,
            format!("outbox.publish: {e}"),
            Some("Events are sent as UTF-8; a SQL_ASCII database must hold UTF-8 text."),
        )
    })
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
        ErrorClass::NotAllowed => PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
    };
    let hint = match &e {
        InvalidEvent::PayloadTooLarge { .. } => Some("Raise outbox.max_payload_bytes, or send less."),
        InvalidEvent::HeadersTooLarge { .. } => {
            Some("Carry large values in the payload, not in headers or the aggregate id.")
        }
        InvalidEvent::ExchangeNotAllowed(_) => {
            Some("An administrator can add the exchange to outbox.allowed_exchanges.")
        }
        _ => None,
    };
    raise_with_hint(code, format!("outbox.publish: {e}"), hint)
}

/// Raises an ERROR with a SQLSTATE and, where the user can act, a hint.
fn raise_with_hint(code: PgSqlErrorCode, message: String, hint: Option<&str>) -> ! {
    raise_in("outbox.publish", code, message, hint)
}

/// Raises an ERROR from `function` with a SQLSTATE and, where the user can act, a hint.
pub(crate) fn raise_in(
    function: &'static str,
    code: PgSqlErrorCode,
    message: String,
    hint: Option<&str>,
) -> ! {
    let report = pgrx::pg_sys::panic::ErrorReport::new(code, message, function);
    match hint {
        Some(hint) => report.set_hint(hint).report(PgLogLevel::ERROR),
        None => report.report(PgLogLevel::ERROR),
    }
    unreachable!("an ERROR does not return")
}
