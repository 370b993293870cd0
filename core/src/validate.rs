//! What `outbox.publish` accepts. Every rule here is checked in the caller's statement, so a bad
//! event fails there with a clear error and nothing is written.

use crate::headers::{self, HeaderError};
use crate::message::header_frame_len;

/// AMQP short strings (exchange, routing key, message type, header names) hold at most 255 bytes.
pub const AMQP_SHORTSTR_MAX: usize = 255;

/// The arguments of `outbox.publish`, borrowed from the call. The payload is already valid
/// JSON (Postgres parsed it into jsonb); only its size is checked here.
#[derive(Debug, Default, Clone, Copy)]
pub struct EventArgs<'a> {
    pub event_type: Option<&'a str>,
    /// Length in bytes of the payload's JSON text; `None` when the payload is SQL NULL.
    pub payload_bytes: Option<usize>,
    pub aggregate_type: Option<&'a str>,
    pub aggregate_id: Option<&'a str>,
    /// The headers' JSON text, when given.
    pub headers: Option<&'a str>,
    pub routing_key: Option<&'a str>,
    pub exchange: Option<&'a str>,
}

/// Which SQLSTATE a rejection maps to; the extension turns these into Postgres errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// 22004 null_value_not_allowed
    NullValue,
    /// 22023 invalid_parameter_value
    InvalidParameter,
    /// 22001 string_data_right_truncation
    StringTooLong,
    /// 54000 program_limit_exceeded
    LimitExceeded,
    /// 42501 insufficient_privilege
    NotAllowed,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidEvent {
    #[error("{0} must not be null")]
    Null(&'static str),
    #[error("{0} must not be empty")]
    Empty(&'static str),
    #[error("{field} is {len} bytes long; AMQP allows at most 255")]
    TooLong { field: &'static str, len: usize },
    #[error("payload is {size} bytes long; outbox.max_payload_bytes allows at most {max}")]
    PayloadTooLarge { size: usize, max: usize },
    #[error(transparent)]
    Headers(#[from] HeaderError),
    #[error(
        "the message's properties and headers take {len} bytes, more than fit in one AMQP frame ({max} bytes, the broker's frame_max)"
    )]
    HeadersTooLarge { len: usize, max: usize },
    #[error("exchange {0:?} is not in outbox.allowed_exchanges")]
    ExchangeNotAllowed(String),
}

impl InvalidEvent {
    pub fn class(&self) -> ErrorClass {
        match self {
            InvalidEvent::Null(_) => ErrorClass::NullValue,
            InvalidEvent::Empty(_) => ErrorClass::InvalidParameter,
            InvalidEvent::TooLong { .. } => ErrorClass::StringTooLong,
            InvalidEvent::PayloadTooLarge { .. } => ErrorClass::LimitExceeded,
            InvalidEvent::Headers(HeaderError::NameTooLong { .. }) => ErrorClass::StringTooLong,
            InvalidEvent::Headers(_) => ErrorClass::InvalidParameter,
            InvalidEvent::HeadersTooLarge { .. } => ErrorClass::LimitExceeded,
            InvalidEvent::ExchangeNotAllowed(_) => ErrorClass::NotAllowed,
        }
    }
}

/// The limits an event is checked against when it is written.
#[derive(Debug, Clone, Copy)]
pub struct Limits<'a> {
    /// `outbox.max_payload_bytes`.
    pub max_payload_bytes: usize,
    /// The broker's `frame_max`, as last negotiated (or its usual default).
    pub frame_max: usize,
    /// `outbox.allowed_exchanges`.
    pub exchanges: &'a ExchangeFilter,
}

/// The length of the message ids `outbox.publish` makes (a uuid's text).
pub const MESSAGE_ID_LEN: usize = 36;

pub fn check_event(args: &EventArgs<'_>, limits: &Limits<'_>) -> Result<(), InvalidEvent> {
    let event_type = args.event_type.ok_or(InvalidEvent::Null("event_type"))?;
    if event_type.is_empty() {
        return Err(InvalidEvent::Empty("event_type"));
    }
    check_short_str("event_type", event_type)?;
    let size = args.payload_bytes.ok_or(InvalidEvent::Null("payload"))?;
    if size > limits.max_payload_bytes {
        return Err(InvalidEvent::PayloadTooLarge { size, max: limits.max_payload_bytes });
    }
    if args.aggregate_id == Some("") {
        return Err(InvalidEvent::Empty("aggregate_id"));
    }
    if let Some(rk) = args.routing_key {
        check_short_str("routing_key", rk)?;
    }
    if let Some(ex) = args.exchange {
        check_short_str("exchange", ex)?;
        if ex == "stream:" {
            return Err(InvalidEvent::Empty("the stream's name in exchange stream:<name>"));
        }
        if !limits.exchanges.allows(ex) {
            return Err(InvalidEvent::ExchangeNotAllowed(ex.to_string()));
        }
    }
    let headers = headers::build(args.headers, args.aggregate_type, args.aggregate_id)?;
    let has_headers = !headers.table.as_ref().is_empty();
    let len = header_frame_len(MESSAGE_ID_LEN, event_type.len(), has_headers.then_some(headers.encoded_len));
    if len > limits.frame_max {
        return Err(InvalidEvent::HeadersTooLarge { len, max: limits.frame_max });
    }
    Ok(())
}

/// `outbox.allowed_exchanges`: the exchanges an event may name.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ExchangeFilter {
    /// `*`: any.
    #[default]
    All,
    /// These names; the default exchange `''` is written `amq.default`.
    Only(Vec<String>),
}

/// How the default exchange (`''`) is written in `outbox.allowed_exchanges`.
pub const DEFAULT_EXCHANGE_ALIAS: &str = "amq.default";

impl ExchangeFilter {
    /// `*`, or names separated by commas (spaces around them are ignored); an empty list
    /// allows none.
    pub fn parse(text: &str) -> Result<ExchangeFilter, String> {
        let text = text.trim();
        if text == "*" {
            return Ok(ExchangeFilter::All);
        }
        if text.is_empty() {
            return Ok(ExchangeFilter::Only(Vec::new()));
        }
        let mut names = Vec::new();
        for item in text.split(',') {
            let name = item.trim();
            if name.is_empty() {
                return Err("an empty name in the list (write the default exchange as amq.default)".into());
            }
            if name == "*" {
                return Err("* stands alone: it allows every exchange".into());
            }
            if name.len() > AMQP_SHORTSTR_MAX {
                return Err(format!("an exchange name is at most 255 bytes long, not {}", name.len()));
            }
            names.push(if name == DEFAULT_EXCHANGE_ALIAS { String::new() } else { name.to_string() });
        }
        Ok(ExchangeFilter::Only(names))
    }

    pub fn allows(&self, exchange: &str) -> bool {
        match self {
            ExchangeFilter::All => true,
            ExchangeFilter::Only(names) => names.iter().any(|n| n == exchange),
        }
    }
}

pub fn check_short_str(field: &'static str, value: &str) -> Result<(), InvalidEvent> {
    if value.len() > AMQP_SHORTSTR_MAX {
        Err(InvalidEvent::TooLong { field, len: value.len() })
    } else {
        Ok(())
    }
}

/// `outbox.database`: the databases served, separated by commas (spaces around a name are
/// ignored); empty: none. At most `max` distinct names, none empty or longer than Postgres
/// allows.
pub fn database_list(text: &str, max: usize) -> Result<Vec<String>, String> {
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let names: Vec<String> = text.split(',').map(|n| n.trim().to_string()).collect();
    if names.len() > max {
        return Err(format!("at most {max} databases can be served"));
    }
    for (i, name) in names.iter().enumerate() {
        if name.is_empty() {
            return Err(format!("entry {} of the list is empty", i + 1));
        }
        if name.len() >= 64 {
            return Err(format!("entry {} is longer than a database name can be (63 bytes)", i + 1));
        }
        if names[..i].contains(name) {
            return Err(format!("database \"{name}\" is listed twice"));
        }
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    static ALL: ExchangeFilter = ExchangeFilter::All;

    fn limits(max_payload_bytes: usize) -> Limits<'static> {
        Limits { max_payload_bytes, frame_max: 131_072, exchanges: &ALL }
    }

    fn ok() -> EventArgs<'static> {
        EventArgs { event_type: Some("E"), payload_bytes: Some(10), ..Default::default() }
    }

    #[test]
    fn accepts_a_minimal_event() {
        assert_eq!(check_event(&ok(), &limits(100)), Ok(()));
        let full = EventArgs {
            aggregate_type: Some("account"),
            aggregate_id: Some("1"),
            headers: Some(r#"{"a":1}"#),
            routing_key: Some(""),
            exchange: Some(""),
            ..ok()
        };
        assert_eq!(check_event(&full, &limits(100)), Ok(()));
    }

    #[test]
    fn rejects_each_bad_argument_with_its_class() {
        let long = "x".repeat(256);
        let cases: Vec<(EventArgs, ErrorClass)> = vec![
            (EventArgs { event_type: None, ..ok() }, ErrorClass::NullValue),
            (EventArgs { event_type: Some(""), ..ok() }, ErrorClass::InvalidParameter),
            (EventArgs { event_type: Some(&long), ..ok() }, ErrorClass::StringTooLong),
            (EventArgs { payload_bytes: None, ..ok() }, ErrorClass::NullValue),
            (EventArgs { payload_bytes: Some(101), ..ok() }, ErrorClass::LimitExceeded),
            (EventArgs { routing_key: Some(&long), ..ok() }, ErrorClass::StringTooLong),
            (EventArgs { exchange: Some(&long), ..ok() }, ErrorClass::StringTooLong),
            (EventArgs { headers: Some("[]"), ..ok() }, ErrorClass::InvalidParameter),
            (EventArgs { headers: Some(r#"{"n":1e400}"#), ..ok() }, ErrorClass::InvalidParameter),
            (EventArgs { aggregate_id: Some(""), ..ok() }, ErrorClass::InvalidParameter),
        ];
        for (args, class) in cases {
            let err = check_event(&args, &limits(100)).expect_err(&format!("{args:?} must be rejected"));
            assert_eq!(err.class(), class, "{args:?}: {err}");
        }
    }

    #[test]
    fn limit_is_inclusive_and_counts_bytes() {
        assert!(check_short_str("exchange", &"é".repeat(127)).is_ok()); // 254 bytes
        assert!(check_short_str("exchange", &"é".repeat(128)).is_err()); // 256 bytes
        assert_eq!(check_event(&EventArgs { payload_bytes: Some(100), ..ok() }, &limits(100)), Ok(()));
    }

    #[test]
    fn headers_must_fit_in_one_frame() {
        let big = format!(r#"{{"blob": "{}"}}"#, "x".repeat(200_000));
        let args = EventArgs { headers: Some(&big), ..ok() };
        let err = check_event(&args, &limits(100)).unwrap_err();
        assert_eq!(err.class(), ErrorClass::LimitExceeded, "{err}");
        let id = "i".repeat(131_000);
        let args = EventArgs { aggregate_id: Some(&id), ..ok() };
        assert!(matches!(check_event(&args, &limits(100)), Err(InvalidEvent::HeadersTooLarge { .. })));
        // Just fits: the frame of a message with no headers but this long an aggregate id.
        let fits = 131_072 - header_frame_len(36, 1, Some(0)) - 4 - (1 + 12 + 1 + 4);
        let id = "i".repeat(fits);
        let args = EventArgs { aggregate_id: Some(&id), ..ok() };
        assert_eq!(check_event(&args, &limits(100)), Ok(()));
        let id = "i".repeat(fits + 1);
        let args = EventArgs { aggregate_id: Some(&id), ..ok() };
        assert!(check_event(&args, &limits(100)).is_err());
    }

    #[test]
    fn allowed_exchanges() {
        assert_eq!(ExchangeFilter::parse(" * "), Ok(ExchangeFilter::All));
        let f = ExchangeFilter::parse("orders, amq.default ,billing").unwrap();
        assert!(f.allows("orders") && f.allows("") && f.allows("billing"));
        assert!(!f.allows("amq.topic") && !f.allows("order"));
        assert!(!ExchangeFilter::parse("").unwrap().allows("x"));
        assert!(ExchangeFilter::parse("a,,b").is_err());
        assert!(ExchangeFilter::parse("a,*").is_err());
        assert!(ExchangeFilter::parse(&"x".repeat(256)).is_err());
        let only = ExchangeFilter::parse("orders").unwrap();
        let l = Limits { max_payload_bytes: 100, frame_max: 131_072, exchanges: &only };
        let err = check_event(&EventArgs { exchange: Some("billing"), ..ok() }, &l).unwrap_err();
        assert_eq!(err.class(), ErrorClass::NotAllowed);
        assert_eq!(check_event(&EventArgs { exchange: Some("orders"), ..ok() }, &l), Ok(()));
        // An event naming no exchange goes to outbox.exchange, the administrator's own choice.
        assert_eq!(check_event(&ok(), &l), Ok(()));
    }

    #[test]
    fn a_database_list_names_each_database_once() {
        assert_eq!(database_list("app", 64).unwrap(), ["app"]);
        assert_eq!(database_list(" app , billing", 64).unwrap(), ["app", "billing"]);
        assert_eq!(database_list(" ", 64).unwrap(), Vec::<String>::new(), "none served");
        assert!(database_list("app,", 64).unwrap_err().contains("entry 2 of the list is empty"));
        assert!(database_list("app,,b", 64).unwrap_err().contains("entry 2"));
        assert!(database_list("app, app", 64).unwrap_err().contains("twice"));
        assert!(database_list("a,b,c", 2).unwrap_err().contains("at most 2"));
        assert!(database_list(&"x".repeat(64), 64).is_err());
    }
}
