//! Check, assign and show hooks: settings are validated when they are set, and
//! `outbox.amqp_url` never shows or logs its password.
//!
//! Postgres logs the raw value of a setting whenever a reload changes it ("parameter ...
//! changed to ...") and whenever a value is rejected, and shows it in `SHOW` and `pg_settings`.
//! So the URL's check hook keeps the real URL in the setting's "extra" data and replaces the
//! value Postgres stores with a fixed mask: a reload never sees a change to log, `SHOW` prints
//! the URL without its password (the show hook), and a rejection prints our own message, never
//! the value.

use pg_outbox_core::validate::{ExchangeFilter, AMQP_SHORTSTR_MAX};
use pg_outbox_core::BrokerUrl;
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr, CString};

/// What Postgres itself stores and compares for `outbox.amqp_url`.
const URL_MASK: &CStr = c"********";

thread_local! {
    /// The accepted URL (from the assign hook), parsed once per change.
    pub(super) static CURRENT_URL: RefCell<Option<BrokerUrl>> = const { RefCell::new(None) };
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
unsafe fn reject(message: String, hint: Option<&str>) -> bool {
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
        let raw = CStr::from_ptr(*newval);
        if raw == URL_MASK {
            // Re-applying the stored (masked) value, e.g. on RESET: keep the current URL.
            let current = CURRENT_URL_RAW.with(|r| r.borrow().clone());
            return match current {
                Some(current) => {
                    *extra = libc::strdup(current.as_ptr()).cast();
                    true
                }
                None => reject("outbox.amqp_url has no value to restore".into(), None),
            };
        }
        let text = match raw.to_str() {
            Ok(t) => t,
            Err(_) => return reject("outbox.amqp_url is not valid UTF-8".into(), None),
        };
        if let Err(e) = BrokerUrl::parse(text) {
            return reject(
                format!("invalid value for parameter \"outbox.amqp_url\": {e}"),
                Some("Write it as amqp://user:password@host:port/vhost, the vhost / as %2F."),
            );
        }
        // GUC memory is malloc'd and freed by Postgres with free() (Postgres 15).
        *extra = libc::strdup(*newval).cast();
        libc::free((*newval).cast());
        *newval = libc::strdup(URL_MASK.as_ptr());
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
    let parsed = raw.to_str().ok().and_then(|t| BrokerUrl::parse(t).ok());
    SHOWN_URL.with(|s| {
        *s.borrow_mut() =
            CString::new(parsed.as_ref().map(|u| u.to_string()).unwrap_or_default()).unwrap_or_default()
    });
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
            let len = CStr::from_ptr(*newval).to_bytes().len();
            if len > AMQP_SHORTSTR_MAX {
                return reject(format!("an exchange name is at most 255 bytes long, not {len}"), None);
            }
        }
    }
    true
}

#[pg_guard]
pub(super) unsafe extern "C-unwind" fn check_allowed_exchanges(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    // SAFETY: as above.
    let text = unsafe {
        if newval.is_null() || (*newval).is_null() {
            return true;
        }
        CStr::from_ptr(*newval).to_string_lossy().into_owned()
    };
    match ExchangeFilter::parse(&text) {
        // SAFETY: called from a check hook.
        Err(e) => unsafe {
            reject(
                format!("invalid value for parameter \"outbox.allowed_exchanges\": {e}"),
                Some("Use * for every exchange, or a comma-separated list of names (amq.default for '')."),
            )
        },
        Ok(_) => true,
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
