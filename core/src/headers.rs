//! JSON header objects as AMQP field tables.
//!
//! Mapping: string → long string, `true`/`false` → boolean, integer within i64 → signed 64-bit,
//! other numbers → double, `null` → void, array → field array, object → nested field table.
//! A field name is an AMQP short string, so it may be at most 255 bytes long.

use amqprs::{FieldName, FieldTable, FieldValue};
use serde_json::{Map, Value};

pub const AGGREGATE_TYPE_HEADER: &str = "aggregate_type";
pub const AGGREGATE_ID_HEADER: &str = "aggregate_id";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("headers must be a JSON object, not {0}")]
    NotAnObject(&'static str),
    #[error("header name {name:?} is {len} bytes long; AMQP allows at most 255")]
    NameTooLong { name: String, len: usize },
    #[error(
        "header {name:?} holds the number {value}, which AMQP cannot carry (integers must fit in 64 bits)"
    )]
    NumberOutOfRange { name: String, value: String },
    #[error("header {0:?} is also given as an argument; pass it in one place only")]
    ConflictsWithArgument(&'static str),
    #[error("headers are not valid JSON: {0}")]
    Json(String),
    #[error("header {0:?} is the event's own (from its argument); outbox.headers may not set it")]
    Reserved(&'static str),
    #[error("header {0:?} tells RabbitMQ where else to route the message; outbox.headers may not set it")]
    Routing(&'static str),
}

pub fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A message's header table and its size on the wire.
#[derive(Debug, Clone, Default)]
pub struct Headers {
    pub table: FieldTable,
    /// Bytes of the table as AMQP encodes it, its 4-byte length included.
    pub encoded_len: usize,
}

/// Builds the headers of a message: the members of `headers` (a JSON object's text) plus
/// `aggregate_type` and `aggregate_id` when given.
pub fn build(
    headers: Option<&str>,
    aggregate_type: Option<&str>,
    aggregate_id: Option<&str>,
) -> Result<Headers, HeaderError> {
    let mut built = match headers {
        None => Headers { table: FieldTable::new(), encoded_len: 4 },
        Some(text) => {
            let value: Value = serde_json::from_str(text).map_err(|e| HeaderError::Json(e.to_string()))?;
            match value {
                Value::Object(map) => object_to_table(&map)?,
                other => return Err(HeaderError::NotAnObject(json_kind(&other))),
            }
        }
    };
    for (name, value) in [(AGGREGATE_TYPE_HEADER, aggregate_type), (AGGREGATE_ID_HEADER, aggregate_id)] {
        if let Some(value) = value {
            let key = field_name(name)?;
            if built.table.get(&key).is_some() {
                return Err(HeaderError::ConflictsWithArgument(name));
            }
            built.encoded_len += entry_len(name, long_string_len(value));
            built.table.insert(key, FieldValue::from(value));
        }
    }
    Ok(built)
}

/// Headers with which RabbitMQ routes a copy of the message to further routing keys.
const SENDER_SELECTED: [&str; 2] = ["CC", "BCC"];

/// Checks a value of `outbox.headers`, the headers added to every event a transaction writes
/// (empty: none). The same rules as an event's own headers, and it may not name the headers
/// that carry the event's aggregate.
pub fn check_ambient(text: &str) -> Result<(), HeaderError> {
    if text.trim().is_empty() {
        return Ok(());
    }
    let value: Value = serde_json::from_str(text).map_err(|e| HeaderError::Json(e.to_string()))?;
    let Value::Object(map) = value else {
        return Err(HeaderError::NotAnObject(json_kind(&value)));
    };
    for name in [AGGREGATE_TYPE_HEADER, AGGREGATE_ID_HEADER] {
        if map.contains_key(name) {
            return Err(HeaderError::Reserved(name));
        }
    }
    // RabbitMQ's sender-selected distribution: these copy the message to further routing
    // keys. The session that sets outbox.headers is not always the one that chose where an
    // event goes (a captured table's owner did, for its writers' changes).
    for name in SENDER_SELECTED {
        if map.keys().any(|k| k.eq_ignore_ascii_case(name)) {
            return Err(HeaderError::Routing(name));
        }
    }
    object_to_table(&map).map(drop)
}

/// An entry of a table: its name (a short string), a type byte, the value.
fn entry_len(name: &str, value_len: usize) -> usize {
    1 + name.len() + 1 + value_len
}

fn long_string_len(s: &str) -> usize {
    4 + s.len()
}

fn object_to_table(map: &Map<String, Value>) -> Result<Headers, HeaderError> {
    let mut table = FieldTable::new();
    let mut encoded_len = 4;
    for (name, value) in map {
        let (v, len) = to_field_value(name, value)?;
        encoded_len += entry_len(name, len);
        table.insert(field_name(name)?, v);
    }
    Ok(Headers { table, encoded_len })
}

fn field_name(name: &str) -> Result<FieldName, HeaderError> {
    name.try_into().map_err(|_| HeaderError::NameTooLong { name: truncate(name, 40), len: name.len() })
}

/// The field value and the bytes it takes after its type byte.
fn to_field_value(name: &str, value: &Value) -> Result<(FieldValue, usize), HeaderError> {
    Ok(match value {
        Value::Null => (FieldValue::V, 0),
        Value::Bool(b) => (FieldValue::t(*b), 1),
        Value::String(s) => (FieldValue::from(s.as_str()), long_string_len(s)),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                (FieldValue::l(i), 8)
            } else if let (false, Some(f)) = (n.is_u64(), n.as_f64()) {
                (FieldValue::d(f), 8)
            } else {
                return Err(HeaderError::NumberOutOfRange { name: truncate(name, 40), value: n.to_string() });
            }
        }
        Value::Array(items) => {
            let mut values = Vec::with_capacity(items.len());
            let mut len = 4;
            for item in items {
                let (v, l) = to_field_value(name, item)?;
                len += 1 + l;
                values.push(v);
            }
            let array = values.try_into().map_err(|_| HeaderError::Json("array too long".into()))?;
            (FieldValue::A(array), len)
        }
        Value::Object(map) => {
            let nested = object_to_table(map)?;
            (FieldValue::F(nested.table), nested.encoded_len)
        }
    })
}

fn truncate(s: &str, max_chars: usize) -> String {
    if s.chars().count() <= max_chars {
        s.to_string()
    } else {
        s.chars().take(max_chars).chain("…".chars()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get<'a>(t: &'a FieldTable, k: &str) -> Option<&'a FieldValue> {
        t.get(&k.try_into().unwrap())
    }

    #[test]
    fn maps_every_json_kind() {
        let t =
            build(Some(r#"{"s":"x","i":-5,"f":1.5,"b":true,"n":null,"a":[1,"y"],"o":{"k":2}}"#), None, None)
                .unwrap()
                .table;
        assert!(matches!(get(&t, "s"), Some(FieldValue::S(_))));
        assert!(matches!(get(&t, "i"), Some(FieldValue::l(-5))));
        assert!(matches!(get(&t, "f"), Some(FieldValue::d(f)) if *f == 1.5));
        assert!(matches!(get(&t, "b"), Some(FieldValue::t(true))));
        assert!(matches!(get(&t, "n"), Some(FieldValue::V)));
        assert!(matches!(get(&t, "a"), Some(FieldValue::A(_))));
        assert!(matches!(get(&t, "o"), Some(FieldValue::F(_))));
    }

    #[test]
    fn adds_aggregate_headers() {
        let t = build(Some(r#"{"tenant":"t1"}"#), Some("account"), Some("123")).unwrap().table;
        assert_eq!(String::try_from(get(&t, "aggregate_type").unwrap().clone()).unwrap(), "account");
        assert_eq!(String::try_from(get(&t, "aggregate_id").unwrap().clone()).unwrap(), "123");
        assert!(get(&t, "tenant").is_some());
        let none = build(None, None, None).unwrap().table;
        assert!(get(&none, "aggregate_id").is_none());
    }

    #[test]
    fn rejects_what_amqp_cannot_carry() {
        assert_eq!(build(Some("[1]"), None, None).unwrap_err(), HeaderError::NotAnObject("an array"));
        assert_eq!(build(Some("null"), None, None).unwrap_err(), HeaderError::NotAnObject("null"));
        let long = format!(r#"{{"{}":1}}"#, "k".repeat(256));
        assert!(matches!(build(Some(&long), None, None), Err(HeaderError::NameTooLong { len: 256, .. })));
        let nested_long = format!(r#"{{"o":{{"{}":1}}}}"#, "k".repeat(300));
        assert!(matches!(build(Some(&nested_long), None, None), Err(HeaderError::NameTooLong { .. })));
        assert!(matches!(
            build(Some(r#"{"big":18446744073709551615}"#), None, None),
            Err(HeaderError::NumberOutOfRange { .. })
        ));
        assert_eq!(
            build(Some(r#"{"aggregate_id":"9"}"#), None, Some("1")).unwrap_err(),
            HeaderError::ConflictsWithArgument("aggregate_id")
        );
        // Without the argument, a header of that name is the caller's own business.
        assert!(build(Some(r#"{"aggregate_id":"9"}"#), None, None).is_ok());
    }

    #[test]
    fn ambient_headers_follow_the_same_rules_and_leave_the_aggregate_alone() {
        assert_eq!(check_ambient(""), Ok(()));
        assert_eq!(check_ambient("  "), Ok(()));
        assert_eq!(
            check_ambient(
                r#"{"traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01","tenant":"acme"}"#
            ),
            Ok(())
        );
        assert_eq!(check_ambient("[]"), Err(HeaderError::NotAnObject("an array")));
        assert!(matches!(check_ambient("{"), Err(HeaderError::Json(_))));
        assert_eq!(check_ambient(r#"{"aggregate_id":"1"}"#), Err(HeaderError::Reserved("aggregate_id")));
        assert_eq!(check_ambient(r#"{"aggregate_type":"a"}"#), Err(HeaderError::Reserved("aggregate_type")));
        assert_eq!(check_ambient(r#"{"BCC":["elsewhere"]}"#), Err(HeaderError::Routing("BCC")));
        assert_eq!(check_ambient(r#"{"cc":"elsewhere"}"#), Err(HeaderError::Routing("CC")));
        assert!(matches!(
            check_ambient(r#"{"n":18446744073709551615}"#),
            Err(HeaderError::NumberOutOfRange { .. })
        ));
    }
}
