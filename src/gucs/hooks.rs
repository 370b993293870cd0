//! Check, assign and show hooks: settings are validated when they are set, and
//! `outbox.amqp_url` never shows or logs its password.
//!
//! Postgres logs the raw value of a setting whenever a reload changes it ("parameter ...
//! changed to ...") and whenever a value is rejected, and shows it in `SHOW` and `pg_settings`.
//! So the URL's check hook keeps the real URL in the setting's "extra" data and replaces the
//! value Postgres stores with a fixed mask: a reload never sees a change to log, `SHOW` prints
//! the URL without its password (the show hook), and a rejection prints our own message, never
//! the value.

use pg_outbox_core::broker_url::{parse_nodes, show_nodes};
use pg_outbox_core::validate::{ExchangeFilter, AMQP_SHORTSTR_MAX};
use pg_outbox_core::{stream, tls, BrokerUrl};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr, CString};
use std::sync::atomic::{AtomicBool, Ordering};

/// What Postgres itself stores and compares for `outbox.amqp_url`.
const URL_MASK: &CStr = c"********";

thread_local! {
    /// The accepted URL (from the assign hook), parsed once per change.
    pub(super) static CURRENT_URL: RefCell<Vec<BrokerUrl>> = const { RefCell::new(Vec::new()) };
    /// The same, as set, to restore it when Postgres re-applies the masked value.
    static CURRENT_URL_RAW: RefCell<Option<CString>> = const { RefCell::new(None) };
    /// Text shown by `SHOW outbox.amqp_url`.
    static SHOWN_URL: RefCell<CString> = RefCell::new(CString::default());
    /// `outbox.allowed_exchanges`, parsed (from its assign hook).
    pub(super) static ALLOWED_EXCHANGES: RefCell<ExchangeFilter> = const { RefCell::new(ExchangeFilter::All) };
}

/// Rejects the value with `message` as the whole error text (so the value is never echoed).
///
/// # Safety
/// Only from a GUC check hook.
pub(super) unsafe fn reject(message: String, hint: Option<&str>) -> bool {
    let message = CString::new(message).unwrap_or_default();
    // SAFETY: a check hook may set these; Postgres copies nothing until the hook returns, and
    // the strings are palloc'd in the current (GUC check) context.
    unsafe {
        pg_sys::GUC_check_errcode(pgrx::PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE as i32);
        pg_sys::GUC_check_errmsg_string = pg_sys::pstrdup(message.as_ptr());
        if let Some(hint) = hint.and_then(|h| CString::new(h).ok()) {
            pg_sys::GUC_check_errhint_string = pg_sys::pstrdup(hint.as_ptr());
        }
    }
    false
}

/// A copy of `s` in the memory Postgres frees a setting's value and "extra" data with: plain
/// `malloc` up to Postgres 15, its own `guc_malloc` (a memory context) since 16, which frees
/// with `guc_free` and would crash on a `malloc`'d pointer. Null when out of memory.
///
/// # Safety
/// `s` is a NUL-terminated string.
pub(super) unsafe fn guc_strdup(s: *const c_char) -> *mut c_char {
    #[cfg(feature = "pg15")]
    // SAFETY: as the caller promises; Postgres 15 frees GUC strings with free().
    return unsafe { libc::strdup(s) };
    #[cfg(not(feature = "pg15"))]
    // SAFETY: as the caller promises; at LOG level an allocation failure returns null.
    return unsafe { pg_sys::guc_strdup(pg_sys::LOG as i32, s) };
}

/// Frees a string Postgres handed to a check hook as the setting's new value, before the
/// hook replaces it (see [`guc_strdup`]).
///
/// # Safety
/// `p` came from Postgres' GUC allocator (or [`guc_strdup`]) and is not used afterwards.
pub(super) unsafe fn guc_free(p: *mut c_void) {
    #[cfg(feature = "pg15")]
    // SAFETY: as the caller promises.
    unsafe {
        libc::free(p)
    };
    #[cfg(not(feature = "pg15"))]
    // SAFETY: as the caller promises.
    unsafe {
        pg_sys::guc_free(p)
    };
}

#[pg_guard]
pub(super) unsafe extern "C-unwind" fn check_amqp_url(
    newval: *mut *mut c_char,
    extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    // SAFETY: Postgres passes valid pointers; a non-null string is NUL-terminated.
    unsafe {
        if newval.is_null() || (*newval).is_null() {
            return reject("outbox.amqp_url must be set".into(), None);
        }
        check_masked(
            newval,
            extra,
            "outbox.amqp_url",
            CURRENT_URL_RAW.with(|r| r.borrow().clone()),
            |text| parse_nodes(text).map(|_| ()).map_err(|e| e.to_string()),
            "Write it as amqp://user:password@host:port/vhost (amqps:// for TLS), the vhost / as %2F; the nodes of one cluster separated by commas.",
        )
    }
}

/// Checks a secret setting's new value with `parse`, and hands Postgres [`URL_MASK`] to keep
/// instead, the value itself going to "extra" (see the module documentation); the mask itself
/// (Postgres re-applying the stored value) restores `current`.
///
/// # Safety
/// Only from a GUC check hook, with its `newval` (not null) and `extra`.
pub(super) unsafe fn check_masked(
    newval: *mut *mut c_char,
    extra: *mut *mut c_void,
    name: &str,
    current: Option<CString>,
    parse: impl FnOnce(&str) -> Result<(), String>,
    hint: &str,
) -> bool {
    // SAFETY: as the caller promises; the strings are NUL-terminated.
    unsafe {
        let raw = CStr::from_ptr(*newval);
        if raw == URL_MASK {
            return match current {
                Some(current) => {
                    *extra = guc_strdup(current.as_ptr()).cast();
                    !(*extra).is_null()
                }
                None => reject(format!("{name} has no value to restore"), None),
            };
        }
        let text = match raw.to_str() {
            Ok(t) => t,
            Err(_) => return reject(format!("{name} is not valid UTF-8"), None),
        };
        if let Err(e) = parse(text) {
            return reject(format!("invalid value for parameter \"{name}\": {e}"), Some(hint));
        }
        *extra = guc_strdup(*newval).cast();
        guc_free((*newval).cast());
        *newval = guc_strdup(URL_MASK.as_ptr());
        !(*newval).is_null() && !(*extra).is_null()
    }
}

#[pg_guard]
pub(super) unsafe extern "C-unwind" fn assign_amqp_url(_newval: *const c_char, extra: *mut c_void) {
    if extra.is_null() {
        return;
    }
    // SAFETY: `extra` is the NUL-terminated copy the check hook made.
    let raw = unsafe { CStr::from_ptr(extra.cast::<c_char>()) }.to_owned();
    let parsed = raw.to_str().ok().and_then(|t| parse_nodes(t).ok()).unwrap_or_default();
    SHOWN_URL.with(|s| *s.borrow_mut() = CString::new(show_nodes(&parsed)).unwrap_or_default());
    CURRENT_URL.with(|u| *u.borrow_mut() = parsed);
    CURRENT_URL_RAW.with(|r| *r.borrow_mut() = Some(raw));
}

#[pg_guard]
pub(super) unsafe extern "C-unwind" fn show_amqp_url() -> *const c_char {
    // Postgres copies the returned string before we are called again.
    SHOWN_URL.with(|s| s.borrow().as_ptr())
}

#[pg_guard]
pub(super) unsafe extern "C-unwind" fn check_short_string(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    // SAFETY: Postgres passes valid pointers; a non-null string is NUL-terminated.
    unsafe {
        if !newval.is_null() && !(*newval).is_null() {
            let value = CStr::from_ptr(*newval);
            let len = value.to_bytes().len();
            if len > AMQP_SHORTSTR_MAX {
                return reject(format!("an exchange name is at most 255 bytes long, not {len}"), None);
            }
            let name = value.to_bytes().strip_prefix(pg_outbox_core::stream::PREFIX.as_bytes());
            let checked = name.map(|n| stream::check_stream_name(&String::from_utf8_lossy(n)));
            if let Some(Err(e)) = checked {
                return reject(
                    format!("invalid stream in outbox.exchange: {e}"),
                    Some("Write stream:<name>."),
                );
            }
        }
    }
    true
}

/// Checks a list setting's new value with `parse`; refuses it naming `name`, with `hint`.
///
/// # Safety
/// Only from a GUC check hook, with its `newval`.
unsafe fn check_list<E: std::fmt::Display>(
    newval: *mut *mut c_char,
    name: &str,
    parse: impl FnOnce(&str) -> Result<(), E>,
    hint: &str,
) -> bool {
    // SAFETY: Postgres passes valid pointers; a non-null string is NUL-terminated.
    let text = unsafe {
        if newval.is_null() || (*newval).is_null() {
            String::new()
        } else {
            CStr::from_ptr(*newval).to_string_lossy().into_owned()
        }
    };
    match parse(&text) {
        // SAFETY: called from a check hook.
        Err(e) => unsafe { reject(format!("invalid value for parameter \"{name}\": {e}"), Some(hint)) },
        Ok(()) => true,
    }
}

#[pg_guard]
pub(super) unsafe extern "C-unwind" fn check_headers(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    // SAFETY: a check hook's `newval`.
    unsafe {
        check_list(
            newval,
            "outbox.headers",
            pg_outbox_core::headers::check_ambient,
            r#"Set a JSON object of header names and values: '{"traceparent": "00-...", "tenant": "acme"}'."#,
        )
    }
}

#[pg_guard]
pub(super) unsafe extern "C-unwind" fn check_database_list(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    let parse = |t: &str| pg_outbox_core::validate::database_list(t, crate::shmem::MAX_DATABASES).map(drop);
    // SAFETY: a check hook's `newval`.
    unsafe {
        check_list(
            newval,
            "outbox.database",
            parse,
            "Name the databases to serve, separated by commas: 'app, billing'.",
        )
    }
}

#[pg_guard]
pub(super) unsafe extern "C-unwind" fn check_allowed_exchanges(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    let parse = |t: &str| ExchangeFilter::parse(t).map(drop);
    // SAFETY: a check hook's `newval`.
    unsafe {
        check_list(
            newval,
            "outbox.allowed_exchanges",
            parse,
            "Use * for every exchange, or a comma-separated list of names (amq.default for '').",
        )
    }
}

#[pg_guard]
pub(super) unsafe extern "C-unwind" fn assign_allowed_exchanges(newval: *const c_char, _extra: *mut c_void) {
    let filter = if newval.is_null() {
        ExchangeFilter::All
    } else {
        // SAFETY: a NUL-terminated string that the check hook accepted.
        let text = unsafe { CStr::from_ptr(newval) }.to_string_lossy();
        ExchangeFilter::parse(&text).unwrap_or_default()
    };
    ALLOWED_EXCHANGES.with(|f| *f.borrow_mut() = filter);
}

/// Whether the last value this process was given for `outbox.amqp_tls_ca_file` was refused.
/// Postgres then keeps the previous value, which at server start is the empty default, "the
/// system's roots": the worker (which inherits this from the postmaster, or sets it at its own
/// reloads) must then not connect at all rather than trust every public CA.
pub(super) static CA_FILE_REFUSED: AtomicBool = AtomicBool::new(false);

/// A value of `outbox.amqp_tls_ca_file` was applied (set, or reset to the default when its
/// line left the configuration): whatever it is, it is what was configured.
#[pg_guard]
pub(super) unsafe extern "C-unwind" fn assign_tls_ca_file(_newval: *const c_char, _extra: *mut c_void) {
    CA_FILE_REFUSED.store(false, Ordering::Relaxed);
}

/// Checks a TLS file setting with `check` (empty: not set).
///
/// # Safety
/// Only from a GUC check hook, with its `newval`.
unsafe fn check_tls_file(
    newval: *mut *mut c_char,
    name: &str,
    check: fn(&std::path::Path) -> Result<(), String>,
) -> bool {
    // SAFETY: as the caller promises.
    let text = unsafe {
        if newval.is_null() || (*newval).is_null() {
            return true;
        }
        CStr::from_ptr(*newval).to_string_lossy().into_owned()
    };
    if text.is_empty() {
        return true;
    }
    match check(std::path::Path::new(&text)) {
        Ok(()) => true,
        // SAFETY: called from a check hook.
        Err(e) => unsafe {
            reject(
                format!("invalid value for parameter \"{name}\": {e}"),
                Some("Give the path of a PEM file the server's operating-system user can read (relative paths are relative to the data directory)."),
            )
        },
    }
}

#[pg_guard]
pub(super) unsafe extern "C-unwind" fn check_tls_ca_file(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    // SAFETY: a check hook.
    let accepted = unsafe { check_tls_file(newval, "outbox.amqp_tls_ca_file", tls::check_ca_file) };
    if !accepted {
        CA_FILE_REFUSED.store(true, Ordering::Relaxed);
    }
    accepted
}

#[pg_guard]
pub(super) unsafe extern "C-unwind" fn check_tls_cert_file(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    // SAFETY: a check hook.
    unsafe { check_tls_file(newval, "outbox.amqp_tls_cert_file", tls::check_cert_file) }
}

#[pg_guard]
pub(super) unsafe extern "C-unwind" fn check_tls_key_file(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    // SAFETY: a check hook.
    unsafe { check_tls_file(newval, "outbox.amqp_tls_key_file", tls::check_key_file) }
}
