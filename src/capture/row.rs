//! Rows as the capture trigger's events show them: the row as JSON, its key, the payload.
//! Text stays in the database's encoding throughout; `jsonb_in` checks what is assembled.

use pgrx::fcinfo::direct_function_call_as_datum;
use pgrx::pg_sys;
use std::ffi::CStr;

/// A row as events show it: its key (the aggregate id) and the JSON text of each captured
/// column, in the database's encoding.
pub(super) struct CapturedRow {
    pub(super) key: Option<Vec<u8>>,
    pub(super) values: Vec<Vec<u8>>,
}

/// The row as jsonb, converted as `row_to_json` does (as the current role).
pub(super) unsafe fn row_jsonb(tuple: pg_sys::HeapTuple, tupdesc: pg_sys::TupleDesc) -> pg_sys::Datum {
    // SAFETY: the caller's tuple and descriptor; each function gets the argument it takes.
    unsafe {
        let composite = pg_sys::heap_copy_tuple_as_datum(tuple, tupdesc);
        let json = direct_function_call_as_datum(pg_sys::row_to_json, &[Some(composite)])
            .expect("row_to_json of a row");
        let text = pg_sys::text_to_cstring(json.cast_mut_ptr());
        direct_function_call_as_datum(pg_sys::jsonb_in, &[Some(pg_sys::Datum::from(text))])
            .expect("jsonb of a row")
    }
}

pub(super) fn text_datum(bytes: &[u8]) -> pg_sys::Datum {
    // SAFETY: copies `bytes` into a new text value.
    pg_sys::Datum::from(unsafe {
        pg_sys::cstring_to_text_with_len(bytes.as_ptr().cast(), bytes.len() as i32)
    })
}

/// The JSON text of the field `name` of a jsonb object (`null` when absent).
pub(super) fn field_text(object: pg_sys::Datum, name: &[u8]) -> Vec<u8> {
    // SAFETY: a jsonb object and a text key; the value's text is copied out.
    unsafe {
        match direct_function_call_as_datum(
            pg_sys::jsonb_object_field,
            &[Some(object), Some(text_datum(name))],
        ) {
            Some(value) => {
                let out =
                    direct_function_call_as_datum(pg_sys::jsonb_out, &[Some(value)]).expect("jsonb_out");
                CStr::from_ptr(out.cast_mut_ptr()).to_bytes().to_vec()
            }
            None => b"null".to_vec(),
        }
    }
}

/// The aggregate id: the key column's value as text (a JSON string's contents; `None` for
/// null), or for several key columns the JSON array of their values.
pub(super) fn key_text(object: pg_sys::Datum, keys: &[&[u8]]) -> Option<Vec<u8>> {
    if let [key] = keys {
        // SAFETY: a jsonb object and a text key.
        let value = unsafe {
            direct_function_call_as_datum(
                pg_sys::jsonb_object_field_text,
                &[Some(object), Some(text_datum(key))],
            )
        }?;
        // SAFETY: a text value.
        let text = unsafe { pg_sys::text_to_cstring(value.cast_mut_ptr()) };
        // SAFETY: NUL-terminated, palloc'd.
        return Some(unsafe { CStr::from_ptr(text) }.to_bytes().to_vec());
    }
    let mut out = b"[".to_vec();
    for (i, key) in keys.iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(&field_text(object, key));
    }
    out.push(b']');
    Some(out)
}

/// Appends `s` as a JSON string. The database's encodings all keep ASCII bytes as ASCII, so
/// escaping byte by byte is right in each; `jsonb_in` checks the rest.
pub(super) fn json_string(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'"');
    for &b in s {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            0..=0x1f => out.extend_from_slice(format!("\\u{b:04x}").as_bytes()),
            _ => out.push(b),
        }
    }
    out.push(b'"');
}

pub(super) fn json_object(names: &[&[u8]], values: &[Vec<u8>]) -> Vec<u8> {
    let mut out = b"{".to_vec();
    for (i, (name, value)) in names.iter().zip(values).enumerate() {
        if i > 0 {
            out.extend_from_slice(b", ");
        }
        json_string(&mut out, name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
    }
    out.push(b'}');
    out
}

pub(super) fn payload(new: Option<&[u8]>, old: Option<&[u8]>, changed: Option<&[u8]>) -> Vec<u8> {
    let mut out = b"{\"new\": ".to_vec();
    out.extend_from_slice(new.unwrap_or(b"null"));
    out.extend_from_slice(b", \"old\": ");
    out.extend_from_slice(old.unwrap_or(b"null"));
    if let Some(changed) = changed {
        out.extend_from_slice(b", \"changed\": ");
        out.extend_from_slice(changed);
    }
    out.push(b'}');
    out
}
