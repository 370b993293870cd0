//! The `outbox.*` settings: definitions, validation when set, and typed getters.
//!
//! `outbox.amqp_url` holds a password, so it gets special care. Postgres logs the raw value
//! of a setting whenever a reload changes it ("parameter ... changed to ...") and whenever a
//! value is rejected, and shows it in `SHOW` and `pg_settings`. So the check hook keeps the
//! real URL in the setting's "extra" data and replaces the value Postgres stores with a fixed
//! mask: a reload never sees a change to log, `SHOW` prints the URL without its password (the
//! show hook), and a rejection prints our own message, never the value.

use pg_outbox_core::retry::RetryPolicy;
use pg_outbox_core::BrokerUrl;
use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr, CString};
use std::time::Duration;

pub const DEFAULT_AMQP_URL: &CStr = c"amqp://guest:guest@localhost:5672/%2F";
/// What Postgres itself stores and compares for `outbox.amqp_url`.
const URL_MASK: &CStr = c"********";

static AMQP_URL: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(DEFAULT_AMQP_URL));
static DATABASE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"postgres"));
static ROLE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c""));
static EXCHANGE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"outbox"));
static DECLARE_EXCHANGE: GucSetting<bool> = GucSetting::<bool>::new(true);
static UNROUTABLE_IS_FAILURE: GucSetting<bool> = GucSetting::<bool>::new(true);
static BATCH_SIZE: GucSetting<i32> = GucSetting::<i32>::new(1000);
static MAX_IN_FLIGHT: GucSetting<i32> = GucSetting::<i32>::new(1000);
static POLL_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(1000);
static CONFIRM_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(30_000);
static MAX_ATTEMPTS: GucSetting<i32> = GucSetting::<i32>::new(10);
static RETRY_BACKOFF_BASE_MS: GucSetting<i32> = GucSetting::<i32>::new(1000);
static RETRY_BACKOFF_MAX_MS: GucSetting<i32> = GucSetting::<i32>::new(300_000);
static RECONNECT_BACKOFF_MAX_MS: GucSetting<i32> = GucSetting::<i32>::new(30_000);
static MAX_PAYLOAD_BYTES: GucSetting<i32> = GucSetting::<i32>::new(1024 * 1024);

thread_local! {
    /// The accepted URL (from the assign hook), parsed once per change.
    static CURRENT_URL: RefCell<Option<BrokerUrl>> = const { RefCell::new(None) };
    /// The same, as set, to restore it when Postgres re-applies the masked value.
    static CURRENT_URL_RAW: RefCell<Option<CString>> = const { RefCell::new(None) };
    /// Text shown by `SHOW outbox.amqp_url`.
    static SHOWN_URL: RefCell<CString> = RefCell::new(CString::default());
}

const HOUR_MS: i32 = 3_600_000;
const MAX_MESSAGE_BYTES: i32 = 512 * 1024 * 1024; // RabbitMQ's hard limit

pub fn init() {
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"outbox.amqp_url",
            c"Broker the worker publishes to: amqp://user:password@host:port/vhost?heartbeat=30.",
            c"Superuser only. The password is never shown or logged; SHOW prints the URL without it.",
            &AMQP_URL,
            GucContext::Sighup,
            GucFlags::SUPERUSER_ONLY | GucFlags::NO_SHOW_ALL,
            Some(check_amqp_url),
            Some(assign_amqp_url),
            Some(show_amqp_url),
        );
        GucRegistry::define_string_guc_with_hooks(
            c"outbox.exchange",
            c"Exchange for events that name none.",
            c"With outbox.declare_exchange on, the worker declares it (durable, topic) on connect.",
            &EXCHANGE,
            GucContext::Sighup,
            GucFlags::default(),
            Some(check_short_string),
            None,
            None,
        );
    }
    GucRegistry::define_string_guc(
        c"outbox.database",
        c"Database whose outbox the worker publishes.",
        c"Changing it on reload restarts the worker in the new database.",
        &DATABASE,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"outbox.role",
        c"Role the worker connects as; empty means the bootstrap superuser.",
        c"The role needs the privileges listed in the README. Changing it on reload restarts the worker.",
        &ROLE,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"outbox.declare_exchange",
        c"Declare outbox.exchange (durable, topic) when connecting.",
        c"",
        &DECLARE_EXCHANGE,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"outbox.unroutable_is_failure",
        c"Publish with the mandatory flag and treat a message no queue receives as failed.",
        c"Off: a message the exchange routes nowhere counts as published and is dropped by the broker.",
        &UNROUTABLE_IS_FAILURE,
        GucContext::Sighup,
        GucFlags::default(),
    );
    type IntGuc = (&'static CStr, &'static CStr, &'static GucSetting<i32>, i32, i32, GucFlags);
    let ints: [IntGuc; 9] = [
        (
            c"outbox.batch_size",
            c"Events read from the outbox per batch.",
            &BATCH_SIZE,
            1,
            100_000,
            GucFlags::default(),
        ),
        (
            c"outbox.max_in_flight",
            c"Published but unconfirmed messages at most.",
            &MAX_IN_FLIGHT,
            1,
            65_535,
            GucFlags::default(),
        ),
        (
            c"outbox.poll_interval",
            c"Fallback wake-up when no commit signals the worker.",
            &POLL_INTERVAL_MS,
            10,
            HOUR_MS,
            GucFlags::UNIT_MS,
        ),
        (
            c"outbox.confirm_timeout",
            c"A message not confirmed this long after the last confirm has failed.",
            &CONFIRM_TIMEOUT_MS,
            100,
            HOUR_MS,
            GucFlags::UNIT_MS,
        ),
        (
            c"outbox.max_attempts",
            c"Attempts before an event is dead-lettered.",
            &MAX_ATTEMPTS,
            1,
            1_000_000,
            GucFlags::default(),
        ),
        (
            c"outbox.retry_backoff_base",
            c"Delay before the second attempt; it doubles with each further one.",
            &RETRY_BACKOFF_BASE_MS,
            1,
            HOUR_MS,
            GucFlags::UNIT_MS,
        ),
        (
            c"outbox.retry_backoff_max",
            c"Longest delay between two attempts of one event.",
            &RETRY_BACKOFF_MAX_MS,
            1,
            24 * HOUR_MS,
            GucFlags::UNIT_MS,
        ),
        (
            c"outbox.reconnect_backoff_max",
            c"Longest wait between two attempts to reach the broker.",
            &RECONNECT_BACKOFF_MAX_MS,
            100,
            HOUR_MS,
            GucFlags::UNIT_MS,
        ),
        (
            c"outbox.max_payload_bytes",
            c"Largest payload outbox.publish accepts (bytes of JSON text).",
            &MAX_PAYLOAD_BYTES,
            1,
            MAX_MESSAGE_BYTES,
            GucFlags::UNIT_BYTE,
        ),
    ];
    for (name, short, setting, min, max, flags) in ints {
        let context =
            if name == c"outbox.max_payload_bytes" { GucContext::Suset } else { GucContext::Sighup };
        GucRegistry::define_int_guc(name, short, c"", setting, min, max, context, flags);
    }
    unsafe { pg_sys::MarkGUCPrefixReserved(c"outbox".as_ptr()) };
}

/// Rejects the value with `message` as the whole error text (so the value is never echoed).
unsafe fn reject(message: String) -> bool {
    let message = CString::new(message).unwrap_or_default();
    pg_sys::GUC_check_errcode(pgrx::PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE as i32);
    pg_sys::GUC_check_errmsg_string = pg_sys::pstrdup(message.as_ptr());
    false
}

#[pg_guard]
unsafe extern "C-unwind" fn check_amqp_url(
    newval: *mut *mut c_char,
    extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    if newval.is_null() || (*newval).is_null() {
        return reject("outbox.amqp_url must be set".into());
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
            None => reject("outbox.amqp_url has no value to restore".into()),
        };
    }
    let text = match raw.to_str() {
        Ok(t) => t,
        Err(_) => return reject("outbox.amqp_url is not valid UTF-8".into()),
    };
    if let Err(e) = BrokerUrl::parse(text) {
        return reject(format!("invalid value for parameter \"outbox.amqp_url\": {e}"));
    }
    // GUC memory is malloc'd and freed by Postgres with free() (Postgres 15).
    *extra = libc::strdup(*newval).cast();
    libc::free((*newval).cast());
    *newval = libc::strdup(URL_MASK.as_ptr());
    !(*newval).is_null() && !(*extra).is_null()
}

#[pg_guard]
unsafe extern "C-unwind" fn assign_amqp_url(_newval: *const c_char, extra: *mut c_void) {
    if extra.is_null() {
        return;
    }
    let raw = CStr::from_ptr(extra.cast::<c_char>()).to_owned();
    let parsed = raw.to_str().ok().and_then(|t| BrokerUrl::parse(t).ok());
    SHOWN_URL.with(|s| {
        *s.borrow_mut() =
            CString::new(parsed.as_ref().map(|u| u.to_string()).unwrap_or_default()).unwrap_or_default()
    });
    CURRENT_URL.with(|u| *u.borrow_mut() = parsed);
    CURRENT_URL_RAW.with(|r| *r.borrow_mut() = Some(raw));
}

#[pg_guard]
unsafe extern "C-unwind" fn show_amqp_url() -> *const c_char {
    // Postgres copies the returned string before we are called again.
    SHOWN_URL.with(|s| s.borrow().as_ptr())
}

#[pg_guard]
unsafe extern "C-unwind" fn check_short_string(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    if !newval.is_null() && !(*newval).is_null() {
        let len = CStr::from_ptr(*newval).to_bytes().len();
        if len > pg_outbox_core::validate::AMQP_SHORTSTR_MAX {
            return reject(format!("an exchange name is at most 255 bytes long, not {len}"));
        }
    }
    true
}

fn string(setting: &GucSetting<Option<CString>>) -> String {
    setting.get().map(|c| c.to_string_lossy().into_owned()).unwrap_or_default()
}

fn ms(setting: &GucSetting<i32>) -> Duration {
    Duration::from_millis(setting.get().max(0) as u64)
}

pub fn amqp_url() -> Option<BrokerUrl> {
    CURRENT_URL.with(|u| u.borrow().clone())
}
pub fn database() -> String {
    string(&DATABASE)
}
/// `None`: the bootstrap superuser.
pub fn role() -> Option<String> {
    Some(string(&ROLE)).filter(|r| !r.is_empty())
}
pub fn exchange() -> String {
    string(&EXCHANGE)
}
pub fn declare_exchange() -> bool {
    DECLARE_EXCHANGE.get()
}
pub fn unroutable_is_failure() -> bool {
    UNROUTABLE_IS_FAILURE.get()
}
pub fn batch_size() -> usize {
    BATCH_SIZE.get() as usize
}
pub fn max_in_flight() -> usize {
    MAX_IN_FLIGHT.get() as usize
}
pub fn poll_interval() -> Duration {
    ms(&POLL_INTERVAL_MS)
}
pub fn confirm_timeout() -> Duration {
    ms(&CONFIRM_TIMEOUT_MS)
}
pub fn reconnect_backoff_max() -> Duration {
    ms(&RECONNECT_BACKOFF_MAX_MS)
}
pub fn max_payload_bytes() -> usize {
    MAX_PAYLOAD_BYTES.get() as usize
}
pub fn retry_policy() -> RetryPolicy {
    RetryPolicy {
        base: ms(&RETRY_BACKOFF_BASE_MS),
        max: ms(&RETRY_BACKOFF_MAX_MS).max(ms(&RETRY_BACKOFF_BASE_MS)),
        max_attempts: MAX_ATTEMPTS.get() as u32,
    }
}
