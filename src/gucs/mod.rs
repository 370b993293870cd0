//! The `outbox.*` settings: one documented static and one definition per setting, validation
//! when set (see [`hooks`]), and typed getters. The worker reads them once per reload into a
//! snapshot (`worker::settings`); `outbox.publish` reads the few it needs per call.

mod hooks;
mod stream_url;
pub use stream_url::stream_url;

use pg_outbox_core::retry::RetryPolicy;
use pg_outbox_core::tls::TlsFiles;
use pg_outbox_core::validate::ExchangeFilter;
use pg_outbox_core::BrokerUrl;
use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::pg_sys;
use std::ffi::{CStr, CString};
use std::path::PathBuf;
use std::time::Duration;

pub const DEFAULT_AMQP_URL: &CStr = c"amqp://guest:guest@localhost:5672/%2F";
const HOUR_MS: i32 = 3_600_000;
/// RabbitMQ's hard limit on a message.
const MAX_MESSAGE_BYTES: i32 = 512 * 1024 * 1024;

/// `outbox.amqp_url`: the broker. Superuser only; its password is never shown or logged.
static AMQP_URL: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(DEFAULT_AMQP_URL));
/// `outbox.amqp_tls_ca_file`, `..._cert_file`, `..._key_file`: PEM files for `amqps://`.
static TLS_CA_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c""));
static TLS_CERT_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c""));
static TLS_KEY_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c""));
/// `outbox.database`: the database whose outbox is published.
static DATABASE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"postgres"));
/// `outbox.role`: the role the worker works as; empty for the bootstrap superuser.
static ROLE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c""));
/// `outbox.exchange`: where events that name no exchange go.
static EXCHANGE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"outbox"));
/// `outbox.allowed_exchanges`: the exchanges an event may name (`*`: any).
static ALLOWED_EXCHANGES: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"*"));
/// `outbox.declare_exchange`: declare `outbox.exchange` (durable, topic) on connect.
static DECLARE_EXCHANGE: GucSetting<bool> = GucSetting::<bool>::new(true);
/// `outbox.unroutable_is_failure`: publish with `mandatory`; a returned message has failed.
static UNROUTABLE_IS_FAILURE: GucSetting<bool> = GucSetting::<bool>::new(true);
/// `outbox.wait_for_sync_standbys`: publish an event only once the synchronous standbys have
/// its transaction.
static WAIT_FOR_SYNC_STANDBYS: GucSetting<bool> = GucSetting::<bool>::new(false);
/// `outbox.batch_size`: events read per round.
static BATCH_SIZE: GucSetting<i32> = GucSetting::<i32>::new(1000);
/// `outbox.max_in_flight`: messages published but not confirmed, at most.
static MAX_IN_FLIGHT: GucSetting<i32> = GucSetting::<i32>::new(1000);
/// `outbox.publishers`: confirm-mode publishers (connections) per worker.
static PUBLISHERS: GucSetting<i32> = GucSetting::<i32>::new(1);
/// Most publishers per worker.
pub const MAX_PUBLISHERS: i32 = 32;
/// `outbox.max_in_flight_bytes` (kB): bytes of events read but not yet confirmed, at most.
static MAX_IN_FLIGHT_KB: GucSetting<i32> = GucSetting::<i32>::new(64 * 1024);
/// `outbox.poll_interval` (ms): the fallback wake-up.
static POLL_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(1000);
/// `outbox.confirm_timeout` (ms): how long unconfirmed messages wait for the broker.
static CONFIRM_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(30_000);
/// `outbox.max_attempts`: attempts before an event is dead-lettered.
static MAX_ATTEMPTS: GucSetting<i32> = GucSetting::<i32>::new(10);
/// `outbox.retry_backoff_base` (ms): the delay before the second attempt.
static RETRY_BACKOFF_BASE_MS: GucSetting<i32> = GucSetting::<i32>::new(1000);
/// `outbox.retry_backoff_max` (ms): the longest delay between attempts.
static RETRY_BACKOFF_MAX_MS: GucSetting<i32> = GucSetting::<i32>::new(300_000);
/// `outbox.reconnect_backoff_max` (ms): the longest wait between attempts to reach the broker.
static RECONNECT_BACKOFF_MAX_MS: GucSetting<i32> = GucSetting::<i32>::new(30_000);
/// `outbox.max_payload_bytes`: the largest payload `outbox.publish` accepts.
static MAX_PAYLOAD_BYTES: GucSetting<i32> = GucSetting::<i32>::new(1024 * 1024);

/// `outbox.headers`: headers added to every event the transaction writes (`SET LOCAL`).
static HEADERS: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c""));
/// `outbox.inbox_retention` (s): how long `outbox.inbox_claim` remembers a message; 0: forever.
static INBOX_RETENTION_S: GucSetting<i32> = GucSetting::<i32>::new(7 * 24 * 3600);

/// Defines every setting and reserves the `outbox.` prefix. Called from `_PG_init`.
pub fn init() {
    // SAFETY: hooks with the signatures Postgres expects, defined in `hooks`.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"outbox.amqp_url",
            c"Broker the worker publishes to: amqp://user:password@host:port/vhost?heartbeat=30 (amqps:// for TLS).",
            c"The nodes of one cluster may be listed, separated by commas: the worker uses the first that answers and moves to the next when its connection is lost. Superuser only. Passwords are never shown or logged; SHOW prints the URLs without them.",
            &AMQP_URL,
            GucContext::Sighup,
            GucFlags::SUPERUSER_ONLY | GucFlags::NO_SHOW_ALL,
            Some(hooks::check_amqp_url),
            Some(hooks::assign_amqp_url),
            Some(hooks::show_amqp_url),
        );
        let tls_file = |name, short, long, setting, check, assign| {
            GucRegistry::define_string_guc_with_hooks(
                name,
                short,
                long,
                setting,
                GucContext::Sighup,
                GucFlags::SUPERUSER_ONLY,
                Some(check),
                assign,
                None,
            )
        };
        tls_file(
            c"outbox.amqp_tls_ca_file",
            c"PEM file of the certificate authorities the broker's certificate must chain to (amqps://).",
            c"Empty: the system's trusted roots. The certificate and the host name are always verified.",
            &TLS_CA_FILE,
            hooks::check_tls_ca_file,
            Some(hooks::assign_tls_ca_file),
        );
        tls_file(
            c"outbox.amqp_tls_cert_file",
            c"PEM file of the client certificate the worker presents to the broker (mutual TLS).",
            c"Set together with outbox.amqp_tls_key_file; empty: no client certificate.",
            &TLS_CERT_FILE,
            hooks::check_tls_cert_file,
            None,
        );
        tls_file(
            c"outbox.amqp_tls_key_file",
            c"PEM file of the private key of outbox.amqp_tls_cert_file.",
            c"Must be readable by the server's operating-system user; its contents are never shown.",
            &TLS_KEY_FILE,
            hooks::check_tls_key_file,
            None,
        );
        GucRegistry::define_string_guc_with_hooks(
            c"outbox.exchange",
            c"Exchange for events that name none.",
            c"With outbox.declare_exchange on, the worker declares it (durable, topic) on connect.",
            &EXCHANGE,
            GucContext::Sighup,
            GucFlags::default(),
            Some(hooks::check_short_string),
            None,
            None,
        );
        GucRegistry::define_string_guc_with_hooks(
            c"outbox.allowed_exchanges",
            c"Exchanges an event may name: * for any, or a comma-separated list (amq.default for '').",
            c"outbox.publish refuses others (SQLSTATE 42501); events naming no exchange go to outbox.exchange.",
            &ALLOWED_EXCHANGES,
            GucContext::Sighup,
            GucFlags::default(),
            Some(hooks::check_allowed_exchanges),
            Some(hooks::assign_allowed_exchanges),
            None,
        );
    }
    // SAFETY: a check hook with the signature Postgres expects, defined in `hooks`.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"outbox.database",
            c"Databases whose outboxes are published, separated by commas: one worker each.",
            c"Adding or removing a database on reload starts or stops only its worker.",
            &DATABASE,
            GucContext::Sighup,
            GucFlags::default(),
            Some(hooks::check_database_list),
            None,
            None,
        );
    }
    GucRegistry::define_string_guc(
        c"outbox.role",
        c"Role the worker works as; empty means the bootstrap superuser.",
        c"The role needs the privileges listed in the README, not LOGIN. Changing it on reload restarts the worker.",
        &ROLE,
        GucContext::Sighup,
        GucFlags::default(),
    );
    let bool_guc = |name, short, long, setting| {
        GucRegistry::define_bool_guc(name, short, long, setting, GucContext::Sighup, GucFlags::default())
    };
    bool_guc(
        c"outbox.declare_exchange",
        c"Declare outbox.exchange (durable, topic) when connecting.",
        c"",
        &DECLARE_EXCHANGE,
    );
    bool_guc(
        c"outbox.unroutable_is_failure",
        c"Publish with the mandatory flag and treat a message no queue receives as failed.",
        c"Off: a message the exchange routes nowhere counts as published and is dropped by the broker.",
        &UNROUTABLE_IS_FAILURE,
    );
    bool_guc(
        c"outbox.wait_for_sync_standbys",
        c"Publish an event only once the synchronous standbys have its transaction.",
        c"Off: once its transaction is durable on this server. See synchronous_standby_names.",
        &WAIT_FOR_SYNC_STANDBYS,
    );
    let int_guc = |name, short, setting, min, max, flags| {
        GucRegistry::define_int_guc(name, short, c"", setting, min, max, GucContext::Sighup, flags)
    };
    int_guc(
        c"outbox.batch_size",
        c"Events read from the outbox per round.",
        &BATCH_SIZE,
        1,
        100_000,
        GucFlags::default(),
    );
    int_guc(
        c"outbox.max_in_flight",
        c"Published but unconfirmed messages at most, per publisher.",
        &MAX_IN_FLIGHT,
        1,
        65_535,
        GucFlags::default(),
    );
    int_guc(
        c"outbox.publishers",
        c"Confirm-mode publishers per worker, each on its own connection; an aggregate's events always use the same one.",
        &PUBLISHERS,
        1,
        MAX_PUBLISHERS,
        GucFlags::default(),
    );
    int_guc(
        c"outbox.max_in_flight_bytes",
        c"Bytes of events read but not yet confirmed at most: bounds the worker's memory.",
        &MAX_IN_FLIGHT_KB,
        1024,
        i32::MAX / 1024,
        GucFlags::UNIT_KB,
    );
    int_guc(
        c"outbox.poll_interval",
        c"Fallback wake-up when no commit signals the worker.",
        &POLL_INTERVAL_MS,
        10,
        HOUR_MS,
        GucFlags::UNIT_MS,
    );
    int_guc(
        c"outbox.confirm_timeout",
        c"A message not confirmed this long after the last confirm has failed.",
        &CONFIRM_TIMEOUT_MS,
        100,
        HOUR_MS,
        GucFlags::UNIT_MS,
    );
    int_guc(
        c"outbox.max_attempts",
        c"Attempts before an event is dead-lettered.",
        &MAX_ATTEMPTS,
        1,
        1_000_000,
        GucFlags::default(),
    );
    int_guc(
        c"outbox.retry_backoff_base",
        c"Delay before the second attempt; it doubles with each further one.",
        &RETRY_BACKOFF_BASE_MS,
        1,
        HOUR_MS,
        GucFlags::UNIT_MS,
    );
    int_guc(
        c"outbox.retry_backoff_max",
        c"Longest delay between two attempts of one event.",
        &RETRY_BACKOFF_MAX_MS,
        1,
        24 * HOUR_MS,
        GucFlags::UNIT_MS,
    );
    int_guc(
        c"outbox.reconnect_backoff_max",
        c"Longest wait between two attempts to reach the broker.",
        &RECONNECT_BACKOFF_MAX_MS,
        100,
        HOUR_MS,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"outbox.max_payload_bytes",
        c"Largest payload outbox.publish accepts (bytes of JSON text).",
        c"",
        &MAX_PAYLOAD_BYTES,
        1,
        MAX_MESSAGE_BYTES,
        GucContext::Suset,
        GucFlags::UNIT_BYTE,
    );
    // SAFETY: a check hook with the signature Postgres expects, defined in `hooks`.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"outbox.headers",
            c"Headers (a JSON object) added to every event written while it is set: SET LOCAL it per transaction.",
            c"For trace context (traceparent, tracestate) and the like. An event's own headers win over these.",
            &HEADERS,
            GucContext::Userset,
            GucFlags::default(),
            Some(hooks::check_headers),
            None,
            None,
        );
    }
    int_guc(
        c"outbox.inbox_retention",
        c"How long outbox.inbox_claim remembers a claimed message; the worker removes older claims. 0: forever.",
        &INBOX_RETENTION_S,
        0,
        i32::MAX,
        GucFlags::UNIT_S,
    );
    stream_url::define();
    // SAFETY: called once, from `_PG_init`, after the settings above are defined.
    unsafe { pg_sys::MarkGUCPrefixReserved(c"outbox".as_ptr()) };
}

fn string(setting: &GucSetting<Option<CString>>) -> String {
    setting.get().map(|c| c.to_string_lossy().into_owned()).unwrap_or_default()
}

fn ms(setting: &GucSetting<i32>) -> Duration {
    Duration::from_millis(setting.get().max(0) as u64)
}
/// `outbox.headers` as set (in the database's encoding), unless empty.
pub fn ambient_headers() -> Option<CString> {
    HEADERS.get().filter(|h| !h.to_bytes().iter().all(u8::is_ascii_whitespace))
}
/// `outbox.inbox_retention`; `None`: claims are kept forever.
pub fn inbox_retention() -> Option<Duration> {
    Some(INBOX_RETENTION_S.get()).filter(|s| *s > 0).map(|s| Duration::from_secs(s as u64))
}
/// The broker's nodes, in the order they are tried; empty while none is set.
pub fn amqp_nodes() -> Vec<BrokerUrl> {
    hooks::CURRENT_URL.with(|u| u.borrow().clone())
}
/// The TLS files, as set now (the files themselves are read at each connection).
pub fn tls_files() -> TlsFiles {
    let path = |s: &GucSetting<Option<CString>>| Some(string(s)).filter(|p| !p.is_empty()).map(PathBuf::from);
    let ca_file = path(&TLS_CA_FILE);
    let ca_file_refused =
        ca_file.is_none() && hooks::CA_FILE_REFUSED.load(std::sync::atomic::Ordering::Relaxed);
    TlsFiles { ca_file_refused, ..TlsFiles::new(ca_file, path(&TLS_CERT_FILE), path(&TLS_KEY_FILE)) }
}
/// The databases of `outbox.database` (checked when set).
pub fn databases() -> Vec<String> {
    pg_outbox_core::validate::database_list(&string(&DATABASE), crate::shmem::MAX_DATABASES)
        .unwrap_or_default()
}
/// `None`: the bootstrap superuser.
pub fn role() -> Option<String> {
    Some(string(&ROLE)).filter(|r| !r.is_empty())
}
pub fn exchange() -> String {
    string(&EXCHANGE)
}
pub fn allowed_exchanges() -> ExchangeFilter {
    with_allowed_exchanges(ExchangeFilter::clone)
}
/// Runs `f` with `outbox.allowed_exchanges`, without copying it.
pub fn with_allowed_exchanges<R>(f: impl FnOnce(&ExchangeFilter) -> R) -> R {
    hooks::ALLOWED_EXCHANGES.with(|a| f(&a.borrow()))
}
pub fn declare_exchange() -> bool {
    DECLARE_EXCHANGE.get()
}
pub fn unroutable_is_failure() -> bool {
    UNROUTABLE_IS_FAILURE.get()
}
pub fn wait_for_sync_standbys() -> bool {
    WAIT_FOR_SYNC_STANDBYS.get()
}
pub fn batch_size() -> usize {
    BATCH_SIZE.get() as usize
}
pub fn max_in_flight() -> usize {
    MAX_IN_FLIGHT.get() as usize
}
pub fn publishers() -> usize {
    PUBLISHERS.get().clamp(1, MAX_PUBLISHERS) as usize
}
pub fn max_in_flight_bytes() -> usize {
    MAX_IN_FLIGHT_KB.get().max(1) as usize * 1024
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
