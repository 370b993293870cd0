//! `outbox.stream_url`: the RabbitMQ stream plugin's address, for events sent to
//! `stream:<name>`. Like `outbox.amqp_url`, its password is never shown or logged: the check
//! hook keeps the real URL in the setting's "extra" data and hands Postgres a mask (see
//! `hooks`); empty means no stream publishing.

use super::hooks::check_masked;
use pg_outbox_core::stream::StreamUrl;
use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr, CString};

static STREAM_URL: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c""));

thread_local! {
    /// The accepted URL, parsed (from the assign hook); `None`: not set.
    static CURRENT: RefCell<Option<StreamUrl>> = const { RefCell::new(None) };
    /// The same, as set, to restore it when Postgres re-applies the masked value.
    static CURRENT_RAW: RefCell<Option<CString>> = const { RefCell::new(None) };
    /// Text shown by `SHOW outbox.stream_url`.
    static SHOWN: RefCell<CString> = RefCell::new(CString::default());
}

/// Defines the setting. Called from `gucs::init`.
pub(super) fn define() {
    // SAFETY: hooks with the signatures Postgres expects, defined below.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"outbox.stream_url",
            c"RabbitMQ stream plugin the worker publishes stream:<name> events to: rabbitmq-stream://user:password@host:5552/vhost.",
            c"Empty: events for a stream wait in the outbox. Superuser only. The password is never shown or logged.",
            &STREAM_URL,
            GucContext::Sighup,
            GucFlags::SUPERUSER_ONLY | GucFlags::NO_SHOW_ALL,
            Some(check),
            Some(assign),
            Some(show),
        );
    }
}

/// The URL as set now; `None` while empty.
pub fn stream_url() -> Option<StreamUrl> {
    CURRENT.with(|u| u.borrow().clone())
}

#[pg_guard]
unsafe extern "C-unwind" fn check(
    newval: *mut *mut c_char,
    extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    // SAFETY: Postgres passes valid pointers; a non-null string is NUL-terminated.
    unsafe {
        if newval.is_null() || (*newval).is_null() || CStr::from_ptr(*newval).is_empty() {
            return true;
        }
        check_masked(
            newval,
            extra,
            "outbox.stream_url",
            CURRENT_RAW.with(|r| r.borrow().clone()),
            |text| StreamUrl::parse(text).map(|_| ()),
            "Write it as rabbitmq-stream://user:password@host:5552/vhost, the vhost / as %2F; or empty for no stream publishing.",
        )
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn assign(_newval: *const c_char, extra: *mut c_void) {
    if extra.is_null() {
        CURRENT.with(|u| *u.borrow_mut() = None);
        CURRENT_RAW.with(|r| *r.borrow_mut() = None);
        SHOWN.with(|s| *s.borrow_mut() = CString::default());
        return;
    }
    // SAFETY: `extra` is the NUL-terminated copy the check hook made.
    let raw = unsafe { CStr::from_ptr(extra.cast::<c_char>()) }.to_owned();
    let parsed = raw.to_str().ok().and_then(|t| StreamUrl::parse(t).ok());
    let shown = parsed.as_ref().map(StreamUrl::shown).unwrap_or_default();
    SHOWN.with(|s| *s.borrow_mut() = CString::new(shown).unwrap_or_default());
    CURRENT.with(|u| *u.borrow_mut() = parsed);
    CURRENT_RAW.with(|r| *r.borrow_mut() = Some(raw));
}

#[pg_guard]
unsafe extern "C-unwind" fn show() -> *const c_char {
    // Postgres copies the returned string before we are called again.
    SHOWN.with(|s| s.borrow().as_ptr())
}
