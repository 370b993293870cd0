//! Text between the database's encoding and UTF-8, the encoding of everything AMQP carries.
//!
//! Postgres guarantees that every text value is valid in the database's encoding. In a UTF-8
//! database (the common case) text is used as it is; in any other it is converted, so that a
//! LATIN1 database's "é" reaches the broker as UTF-8. SQL_ASCII declares no encoding at all:
//! its text is taken as UTF-8 when it is valid UTF-8, and refused otherwise.
//!
//! pgrx's own `&str`/`String` conversions panic on non-ASCII text in such databases, so text
//! that may hold user data is always read through here.

use pgrx::pg_sys;
use std::borrow::Cow;
use std::ffi::c_char;

/// Why a text cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotUtf8(pub String);

impl std::fmt::Display for NotUtf8 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn database_encoding() -> pg_sys::pg_enc::Type {
    // SAFETY: reads a field of the database's encoding, set once at connection time.
    unsafe { pg_sys::GetDatabaseEncoding() as pg_sys::pg_enc::Type }
}

pub fn is_utf8_database() -> bool {
    database_encoding() == pg_sys::pg_enc::PG_UTF8
}

/// The bytes of a text (or any varlena) datum, detoasted into the current memory context.
///
/// # Safety
/// `datum` must be a non-null datum of a varlena type, valid for `'a`.
pub unsafe fn varlena_bytes<'a>(datum: pg_sys::Datum) -> &'a [u8] {
    // SAFETY: the caller promises a varlena datum; detoasting returns a pointer valid as long
    // as the current memory context, which outlives 'a by the caller's promise.
    unsafe {
        let detoasted = pg_sys::pg_detoast_datum_packed(datum.cast_mut_ptr());
        pgrx::varlena_to_byte_slice(detoasted)
    }
}

/// Text in the database's encoding, as UTF-8. In a database that is not UTF-8 this converts,
/// and raises a Postgres error for text UTF-8 cannot hold (no encoding has such characters
/// today) or for SQL_ASCII text that is not valid UTF-8.
pub fn to_utf8(bytes: &[u8]) -> Result<Cow<'_, str>, NotUtf8> {
    if is_utf8_database() || database_encoding() == pg_sys::pg_enc::PG_SQL_ASCII {
        return std::str::from_utf8(bytes)
            .map(Cow::Borrowed)
            .map_err(|e| NotUtf8(format!("text is not valid UTF-8 ({e})")));
    }
    if bytes.is_empty() {
        return Ok(Cow::Borrowed(""));
    }
    let len = i32::try_from(bytes.len()).map_err(|_| NotUtf8("text too long".into()))?;
    // SAFETY: `bytes` is valid for `len` bytes. The result is either `bytes` itself (no
    // conversion needed) or a palloc'd, NUL-terminated string in the current memory context.
    unsafe {
        let converted =
            pg_sys::pg_server_to_any(bytes.as_ptr().cast::<c_char>(), len, pg_sys::pg_enc::PG_UTF8 as i32);
        let out = if converted.cast_const() == bytes.as_ptr().cast::<c_char>() {
            bytes
        } else {
            std::ffi::CStr::from_ptr(converted).to_bytes()
        };
        std::str::from_utf8(out)
            .map(|s| Cow::Owned(s.to_string()))
            .map_err(|e| NotUtf8(format!("text is not valid UTF-8 after conversion ({e})")))
    }
}

/// A text datum in the database's encoding for a Rust string of diagnostics (an error
/// message): in a database that is not UTF-8, characters outside ASCII become '?', so that the
/// conversion can never fail.
pub fn diagnostic_text(text: &str) -> pg_sys::Datum {
    let text: Cow<'_, str> = if is_utf8_database() || text.is_ascii() {
        Cow::Borrowed(text)
    } else {
        Cow::Owned(text.chars().map(|c| if c.is_ascii() { c } else { '?' }).collect())
    };
    let len = text.len().min(i32::MAX as usize) as i32;
    // SAFETY: copies `len` bytes of `text` into a new text value in the current memory context.
    unsafe { pg_sys::Datum::from(pg_sys::cstring_to_text_with_len(text.as_ptr().cast::<c_char>(), len)) }
}
