//! What `outbox.publish` accepts. Every rule here is checked in the caller's statement, so a bad
//! event fails there with a clear error and nothing is written.

use crate::headers::{self, HeaderError};

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
        }
    }
}

pub fn check_event(args: &EventArgs<'_>, max_payload_bytes: usize) -> Result<(), InvalidEvent> {
    let event_type = args.event_type.ok_or(InvalidEvent::Null("event_type"))?;
    if event_type.is_empty() {
        return Err(InvalidEvent::Empty("event_type"));
    }
    check_short_str("event_type", event_type)?;
    let size = args.payload_bytes.ok_or(InvalidEvent::Null("payload"))?;
    if size > max_payload_bytes {
        return Err(InvalidEvent::PayloadTooLarge { size, max: max_payload_bytes });
    }
    if args.aggregate_id == Some("") {
        return Err(InvalidEvent::Empty("aggregate_id"));
    }
    if let Some(rk) = args.routing_key {
        check_short_str("routing_key", rk)?;
    }
    if let Some(ex) = args.exchange {
        check_short_str("exchange", ex)?;
    }
    headers::build(args.headers, args.aggregate_type, args.aggregate_id)?;
    Ok(())
}

pub fn check_short_str(field: &'static str, value: &str) -> Result<(), InvalidEvent> {
    if value.len() > AMQP_SHORTSTR_MAX {
        Err(InvalidEvent::TooLong { field, len: value.len() })
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> EventArgs<'static> {
        EventArgs { event_type: Some("E"), payload_bytes: Some(10), ..Default::default() }
    }

    #[test]
    fn accepts_a_minimal_event() {
        assert_eq!(check_event(&ok(), 100), Ok(()));
        let full = EventArgs {
            aggregate_type: Some("account"),
            aggregate_id: Some("1"),
            headers: Some(r#"{"a":1}"#),
            routing_key: Some(""),
            exchange: Some(""),
            ..ok()
        };
        assert_eq!(check_event(&full, 100), Ok(()));
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
            let err = check_event(&args, 100).expect_err(&format!("{args:?} must be rejected"));
            assert_eq!(err.class(), class, "{args:?}: {err}");
        }
    }

    #[test]
    fn limit_is_inclusive_and_counts_bytes() {
        assert!(check_short_str("exchange", &"é".repeat(127)).is_ok()); // 254 bytes
        assert!(check_short_str("exchange", &"é".repeat(128)).is_err()); // 256 bytes
        assert_eq!(check_event(&EventArgs { payload_bytes: Some(100), ..ok() }, 100), Ok(()));
    }
}
