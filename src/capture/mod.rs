//! `outbox.capture_row()`: the trigger function `outbox.capture` installs (sql/capture.sql).
//! It turns each inserted, updated or deleted row into an event and writes it with
//! `outbox.publish`.
//!
//! It runs as the role that modifies the table, like any trigger: converting a row to JSON may
//! run code of the table's owner (a cast to `json` of a column's type), which must never run as
//! the extension's owner. Only the call of `outbox.publish` runs as the extension's owner,
//! as a `SECURITY DEFINER` call would, so the modifying role needs no privilege on the outbox.
//! Who may install the trigger is controlled by `EXECUTE` on `outbox.capture_row()`, which
//! `CREATE TRIGGER` checks.
//!
//! The configuration is in the trigger's arguments, one `name=value` each: `prefix=`,
//! `aggregate_type=`, `key=` (one per key column, in order), `column=` (none: every column),
//! `exchange=` (none: `outbox.exchange`). So `pg_dump` and `DROP TABLE` need nothing else.

use crate::api::outbox_publish;
use pgrx::fcinfo::{direct_function_call_as_datum, direct_pg_extern_function_call_as_datum};
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;
use std::ffi::CStr;

mod row;
use row::{field_text, json_object, json_string, key_text, payload, row_jsonb, text_datum, CapturedRow};

#[no_mangle]
pub extern "C" fn pg_finfo_outbox_capture_row() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// The trigger's arguments, as bytes in the database's encoding.
struct Config<'a> {
    prefix: &'a [u8],
    aggregate_type: &'a [u8],
    exchange: Option<&'a [u8]>,
    keys: Vec<&'a [u8]>,
    /// `None`: every column.
    columns: Option<Vec<&'a [u8]>>,
}

impl<'a> Config<'a> {
    fn parse(args: &[&'a [u8]]) -> Result<Config<'a>, String> {
        let (mut prefix, mut aggregate_type, mut exchange) = (None, None, None);
        let (mut keys, mut columns) = (Vec::new(), Vec::new());
        for arg in args {
            let eq = arg.iter().position(|b| *b == b'=').ok_or("an argument without \"=\"")?;
            let (name, value) = (&arg[..eq], &arg[eq + 1..]);
            match name {
                b"prefix" => prefix = Some(value),
                b"aggregate_type" => aggregate_type = Some(value),
                b"exchange" => exchange = Some(value),
                b"key" => keys.push(value),
                b"column" => columns.push(value),
                _ => return Err(format!("unknown argument \"{}\"", String::from_utf8_lossy(name))),
            }
        }
        if keys.is_empty() {
            return Err("no key column".into());
        }
        Ok(Config {
            prefix: prefix.ok_or("no prefix")?,
            aggregate_type: aggregate_type.ok_or("no aggregate_type")?,
            exchange,
            keys,
            columns: (!columns.is_empty()).then_some(columns),
        })
    }
}

/// One event to write.
struct Event {
    suffix: &'static str,
    payload: Vec<u8>,
    aggregate_id: Option<Vec<u8>>,
}

/// `outbox.capture_row()`, an AFTER trigger: FOR EACH ROW on INSERT, UPDATE and DELETE, FOR
/// EACH STATEMENT on TRUNCATE.
///
/// # Safety
/// Called by Postgres' function manager; checks that it was called as a trigger.
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn outbox_capture_row(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: `fcinfo` comes from Postgres; its context is a node when set.
    let td = unsafe { (*fcinfo).context };
    // SAFETY: a non-null context is a Node.
    if td.is_null() || unsafe { (*td).type_ } != pg_sys::NodeTag::T_TriggerData {
        raise(
            PgSqlErrorCode::ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED,
            "outbox.capture_row() can only be called as a trigger".into(),
            Some("Use outbox.capture(table) to capture a table's changes."),
        );
    }
    // SAFETY: checked above; the trigger manager keeps it alive for the call.
    let td = unsafe { &*(td as *const pg_sys::TriggerData) };
    let event = td.tg_event;
    let op = event & pg_sys::TRIGGER_EVENT_OPMASK;
    let row_level = event & pg_sys::TRIGGER_EVENT_ROW != 0;
    let after = event & (pg_sys::TRIGGER_EVENT_BEFORE | pg_sys::TRIGGER_EVENT_INSTEAD) == 0;
    if !after || row_level == (op == pg_sys::TRIGGER_EVENT_TRUNCATE) {
        raise(
            PgSqlErrorCode::ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED,
            "outbox.capture_row() must be fired AFTER, FOR EACH ROW on INSERT, UPDATE and DELETE and FOR EACH STATEMENT on TRUNCATE".into(),
            Some("Use outbox.capture(table), which creates the triggers."),
        );
    }
    // SAFETY: the trigger and its arguments live as long as the call.
    let args: Vec<&[u8]> = unsafe {
        let trigger = &*td.tg_trigger;
        (0..trigger.tgnargs.max(0) as usize)
            .map(|i| CStr::from_ptr(*trigger.tgargs.add(i)).to_bytes())
            .collect()
    };
    let config = Config::parse(&args).unwrap_or_else(|e| {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("outbox.capture_row(): bad trigger arguments on table {}: {e}", relation_name(td)),
            Some("Capture the table again with outbox.capture(table), which writes the arguments."),
        )
    });

    let events = if op == pg_sys::TRIGGER_EVENT_TRUNCATE {
        vec![Event { suffix: ".truncated", payload: b"{}".to_vec(), aggregate_id: None }]
    } else {
        // SAFETY: a row-level trigger on a table: the relation and its tuples are valid.
        unsafe { row_events(td, op, &config) }
    };
    if !events.is_empty() {
        // SAFETY: called from the function manager, which set flinfo.
        let owner = unsafe { function_owner((*(*fcinfo).flinfo).fn_oid) };
        for event in events {
            publish(&config, event, owner);
        }
    }
    // An AFTER trigger's result is ignored: a null pointer, as the trigger protocol allows
    // (it forbids setting isnull).
    pg_sys::Datum::from(0)
}

/// The events of one row change (none for an UPDATE that changes no captured column).
unsafe fn row_events(td: &pg_sys::TriggerData, op: u32, config: &Config) -> Vec<Event> {
    // SAFETY: the relation is open for the trigger's call.
    let tupdesc = unsafe { (*td.tg_relation).rd_att };
    // SAFETY: the relation's own descriptor, alive (and not ours to release) for the call;
    // pgrx reads its attributes as each Postgres version lays them out.
    let desc = unsafe { pgrx::PgTupleDesc::from_pg_unchecked(tupdesc) };
    let columns: Vec<Vec<u8>> = desc
        .iter()
        .filter(|a| !a.attisdropped)
        // SAFETY: attname is a NUL-terminated NameData.
        .map(|a| unsafe { CStr::from_ptr(a.attname.data.as_ptr()) }.to_bytes().to_vec())
        .collect();
    let columns: Vec<&[u8]> = columns.iter().map(Vec::as_slice).collect();
    for key in &config.keys {
        if !columns.contains(key) {
            raise(
                PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
                format!(
                    "outbox.capture_row(): key column \"{}\" of table {} does not exist (renamed or dropped since outbox.capture)",
                    String::from_utf8_lossy(key),
                    relation_name(td)
                ),
                Some("Capture the table again with outbox.capture(table, key_columns => ...) naming its current key columns."),
            );
        }
    }
    let captured: Vec<&[u8]> = match &config.columns {
        None => columns,
        Some(list) => columns.into_iter().filter(|c| list.contains(c)).collect(),
    };
    let row = |tuple: pg_sys::HeapTuple| {
        // SAFETY: a tuple of this relation, described by its descriptor.
        let json = unsafe { row_jsonb(tuple, tupdesc) };
        CapturedRow {
            key: key_text(json, &config.keys),
            values: captured.iter().map(|c| field_text(json, c)).collect(),
        }
    };
    let object = |r: &CapturedRow| json_object(&captured, &r.values);
    match op {
        pg_sys::TRIGGER_EVENT_INSERT => {
            let new = row(td.tg_trigtuple);
            vec![Event {
                suffix: ".inserted",
                payload: payload(Some(&object(&new)), None, None),
                aggregate_id: new.key,
            }]
        }
        pg_sys::TRIGGER_EVENT_DELETE => {
            let old = row(td.tg_trigtuple);
            vec![Event {
                suffix: ".deleted",
                payload: payload(None, Some(&object(&old)), None),
                aggregate_id: old.key,
            }]
        }
        _ => {
            let (old, new) = (row(td.tg_trigtuple), row(td.tg_newtuple));
            if old.key != new.key {
                // A new identity: the old aggregate ends, a new one begins (as Debezium does).
                return vec![
                    Event {
                        suffix: ".deleted",
                        payload: payload(None, Some(&object(&old)), None),
                        aggregate_id: old.key.clone(),
                    },
                    Event {
                        suffix: ".inserted",
                        payload: payload(Some(&object(&new)), None, None),
                        aggregate_id: new.key.clone(),
                    },
                ];
            }
            let changed: Vec<&[u8]> = captured
                .iter()
                .zip(old.values.iter().zip(&new.values))
                .filter(|(_, (o, n))| o != n)
                .map(|(c, _)| *c)
                .collect();
            if changed.is_empty() {
                return Vec::new();
            }
            let mut list = b"[".to_vec();
            for (i, c) in changed.iter().enumerate() {
                if i > 0 {
                    list.extend_from_slice(b", ");
                }
                json_string(&mut list, c);
            }
            list.push(b']');
            vec![Event {
                suffix: ".updated",
                payload: payload(Some(&object(&new)), Some(&object(&old)), Some(&list)),
                aggregate_id: new.key,
            }]
        }
    }
}

/// Writes one event through `outbox.publish` (its validation, locks and insert), as the
/// extension's owner: what a `SECURITY DEFINER` call of it would do.
fn publish(config: &Config, event: Event, owner: pg_sys::Oid) {
    let mut event_type = config.prefix.to_vec();
    event_type.extend_from_slice(event.suffix.as_bytes());
    let mut payload = event.payload;
    payload.push(0);
    // SAFETY: a NUL-terminated JSON text in the database's encoding.
    let payload = unsafe {
        direct_function_call_as_datum(pg_sys::jsonb_in, &[Some(pg_sys::Datum::from(payload.as_ptr()))])
    };
    let args = [
        Some(text_datum(&event_type)),
        payload,
        Some(text_datum(config.aggregate_type)),
        event.aggregate_id.as_deref().map(text_datum),
        None,
        None,
        config.exchange.map(text_datum),
    ];
    let (mut saved_user, mut saved_context) = (pg_sys::Oid::INVALID, 0);
    // SAFETY: the same switch fmgr_security_definer makes around a SECURITY DEFINER function.
    // An error in between is cleaned up by the (sub)transaction abort, which restores both.
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_context);
        pg_sys::SetUserIdAndSecContext(owner, saved_context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32);
        direct_pg_extern_function_call_as_datum(outbox_publish, &args);
        pg_sys::SetUserIdAndSecContext(saved_user, saved_context);
    }
}

/// The owner of a function (here: of `outbox.capture_row()`, the extension's owner).
unsafe fn function_owner(function: pg_sys::Oid) -> pg_sys::Oid {
    // SAFETY: a syscache lookup by oid, released before returning.
    unsafe {
        let tuple = pg_sys::SearchSysCache1(pg_sys::SysCacheIdentifier::PROCOID as i32, function.into());
        if tuple.is_null() {
            raise(
                PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                format!("cache lookup failed for function {function:?}"),
                None,
            );
        }
        let owner = (*pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_proc>(tuple)).proowner;
        pg_sys::ReleaseSysCache(tuple);
        owner
    }
}

fn relation_name(td: &pg_sys::TriggerData) -> String {
    // SAFETY: the trigger's relation is open; the name is copied.
    unsafe {
        let rel = &*td.tg_relation;
        let name = pg_sys::quote_qualified_identifier(
            pg_sys::get_namespace_name((*rel.rd_rel).relnamespace),
            (*rel.rd_rel).relname.data.as_ptr(),
        );
        CStr::from_ptr(name).to_string_lossy().into_owned()
    }
}

fn raise(code: PgSqlErrorCode, message: String, hint: Option<&str>) -> ! {
    crate::api::raise_in("outbox.capture_row", code, message, hint)
}
