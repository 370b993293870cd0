//! An outbox row as the AMQP 1.0 message a stream stores: the same contract as the AMQP 0-9-1
//! path ([`OutboxMessage::envelope`]), in AMQP 1.0's terms.
//!
//! - body: the payload's JSON text, as one data section;
//! - properties: `message-id` the event's uuid (as a string), `content-type`
//!   `application/json`, `subject` the event type, `creation-time` when the event was written
//!   (AMQP 1.0 timestamps are milliseconds: whole seconds × 1000); nothing else;
//! - application properties: the headers the AMQP path sends (the event's headers object, plus
//!   `aggregate_type` and `aggregate_id` when given), and `event_type` (the event type again,
//!   for consumers that read only application properties) and `app_id` (`pg_outbox`), which
//!   win over headers of those names.
//!
//! AMQP 1.0 allows only simple values in application properties, so a header's JSON value
//! becomes: string → string, integer → long (but -128 to 127 → int, see below; a `u64` beyond
//! `i64` → its decimal text, though [`encode`] refuses it as the AMQP path does), other number
//! → double, `true`/`false` → boolean, `null` → null, array or object → its compact JSON text,
//! as a string.
//!
//! There is no header section (no `durable` flag: a stream stores every message), no
//! delivery or message annotations and no footer.
//!
//! Two limits come from the encoder of `rabbitmq-stream-protocol` 0.4.3, which announces some
//! messages with a wrong length (a corrupt frame):
//! - it counts a long between -128 and 127 one byte longer than it writes it, so such a header
//!   value is sent as an int;
//! - it cannot write a properties section whose content exceeds 252 bytes, so an event type
//!   too long to fit next to the message id (more than 176 bytes with a uuid) is left out of
//!   `subject` (it is still the `event_type` application property), and a message id of more
//!   than 213 bytes is refused.
//!
//! [`encode`] also writes every message once and refuses any whose length would be announced
//! wrongly.
//!
//! [`OutboxMessage::envelope`]: crate::message::OutboxMessage::envelope

use crate::headers::{self, AGGREGATE_ID_HEADER, AGGREGATE_TYPE_HEADER};
use crate::message::{OutboxMessage, APP_ID, CONTENT_TYPE};
use crate::validate::{check_short_str, InvalidEvent};
use rabbitmq_stream_protocol::codec::Encoder;
use rabbitmq_stream_protocol::message::{Message, SimpleValue};
use serde_json::Value;

/// The application property that repeats the event type.
pub const EVENT_TYPE_PROPERTY: &str = "event_type";
/// The application property that names the sender, [`APP_ID`].
pub const APP_ID_PROPERTY: &str = "app_id";

/// Bytes of a publish frame besides its messages: the frame's length (4), command key and
/// version (4), publisher id (1) and message count (4).
pub const PUBLISH_FRAME_OVERHEAD: usize = 4 + 4 + 1 + 4;

/// The most content a properties section may have: beyond it, the protocol crate's encoder
/// writes a corrupt section.
const PROPERTIES_CONTENT_MAX: usize = 252;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// A row `outbox.publish` would have refused: the error the AMQP path gives it.
    #[error(transparent)]
    Invalid(#[from] InvalidEvent),
    /// A message id too long for the protocol crate to write next to the other properties;
    /// `outbox.publish` makes 36-byte ones.
    #[error("message_id is {len} bytes long; a stream message's message id may have at most {max}")]
    MessageIdTooLong { len: usize, max: usize },
    /// The protocol crate would announce a length other than the one it writes: sending the
    /// message would corrupt the frame. A guard against its bugs that [`encode`] does not
    /// already work around.
    #[error("the stream client would announce this message as {announced} bytes long, but it is {written}")]
    Misframed { announced: usize, written: usize },
}

/// The AMQP 1.0 message of an outbox row. Fails for a row that `outbox.publish` would have
/// refused, with the error [`OutboxMessage::envelope`] gives it, and for a message the stream
/// client cannot send (see the module's documentation).
///
/// [`OutboxMessage::envelope`]: crate::message::OutboxMessage::envelope
pub fn encode(m: &OutboxMessage) -> Result<Message, EncodeError> {
    check_short_str("event_type", &m.event_type)?;
    check_short_str("message_id", &m.message_id)?;
    // The AMQP path's rules (a JSON object, names of at most 255 bytes, integers within 64
    // bits, no clash with the aggregate arguments), with the same errors.
    headers::build(m.headers.as_deref(), m.aggregate_type.as_deref(), m.aggregate_id.as_deref())
        .map_err(InvalidEvent::from)?;
    let mut properties = Vec::new();
    if let Some(text) = m.headers.as_deref() {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| InvalidEvent::from(headers::HeaderError::Json(e.to_string())))?;
        if let Value::Object(map) = value {
            properties.extend(map.iter().map(|(name, value)| (name.clone(), simple_value(value))));
        }
    }
    for (name, value) in [(AGGREGATE_TYPE_HEADER, &m.aggregate_type), (AGGREGATE_ID_HEADER, &m.aggregate_id)]
    {
        if let Some(value) = value {
            properties.push((name.to_string(), SimpleValue::from(value.as_str())));
        }
    }
    properties.retain(|(name, _)| name != EVENT_TYPE_PROPERTY && name != APP_ID_PROPERTY);
    properties.push((EVENT_TYPE_PROPERTY.to_string(), SimpleValue::from(m.event_type.as_str())));
    properties.push((APP_ID_PROPERTY.to_string(), SimpleValue::from(APP_ID)));

    // Out of chrono's range only after the year 262143; such a time is left out.
    let created = i64::try_from(m.created_at_unix).ok().and_then(|s| chrono::DateTime::from_timestamp(s, 0));
    let content = |subject| properties_content_len(m.message_id.len(), subject, created.is_some());
    let with_subject = content(Some(m.event_type.len())) <= PROPERTIES_CONTENT_MAX;
    if !with_subject && content(None) > PROPERTIES_CONTENT_MAX {
        let max = m.message_id.len() - (content(None) - PROPERTIES_CONTENT_MAX);
        return Err(EncodeError::MessageIdTooLong { len: m.message_id.len(), max });
    }
    let mut builder = Message::builder()
        .body(m.body.clone())
        .properties()
        .message_id(m.message_id.clone())
        .content_type(CONTENT_TYPE);
    if with_subject {
        builder = builder.subject(m.event_type.clone());
    }
    if let Some(created) = created {
        builder = builder.creation_time(created);
    }
    let mut builder = builder.message_builder().application_properties();
    for (name, value) in properties {
        builder = builder.insert(name, value);
    }
    let message = builder.message_builder().build();
    check_framing(&message)?;
    Ok(message)
}

/// Bytes of the content of the properties [`encode`] sets: the message id, the subject (or
/// null), the content type, the creation time (or null), and null for the nine others.
fn properties_content_len(message_id: usize, subject: Option<usize>, created: bool) -> usize {
    let string = |len: usize| if len > 255 { 5 + len } else { 2 + len };
    string(message_id)
        + subject.map_or(1, string)
        + string(CONTENT_TYPE.len())
        + if created { 9 } else { 1 }
        + 9
}

/// Refuses a message whose length the client would announce wrongly: it writes the length the
/// encoder computes, then the bytes the encoder writes.
fn check_framing(message: &Message) -> Result<(), EncodeError> {
    let mut bytes = Vec::with_capacity(message.encoded_size() as usize);
    let announced = message.encoded_size() as usize;
    let written = message.encode(&mut bytes).map(|()| bytes.len());
    if written.is_err() || announced != bytes.len() {
        return Err(EncodeError::Misframed { announced, written: bytes.len() });
    }
    Ok(())
}

/// `msg` carrying `publishing_id`, the id the client sends it with. The client takes a
/// message's publishing id only from the message itself, and a built message cannot be
/// changed, so it is built again: every part [`encode`] sets (and the other properties, message
/// annotations and application properties) is copied; a header section, delivery annotations,
/// a footer or a body other than one data section would be lost.
pub(super) fn with_publishing_id(msg: &Message, publishing_id: u64) -> Message {
    let mut builder = Message::builder().publising_id(publishing_id);
    if let Some(data) = msg.data() {
        builder = builder.body(data);
    }
    if let Some(p) = msg.properties().cloned() {
        let mut b = builder.properties();
        macro_rules! copy {
            ($($field:ident),*) => { $(if let Some(v) = p.$field { b = b.$field(v); })* };
        }
        copy!(message_id, user_id, to, subject, reply_to, correlation_id, content_type, content_encoding);
        copy!(absolute_expiry_time, creation_time, group_id, group_sequence, reply_to_group_id);
        builder = b.message_builder();
    }
    if let Some(annotations) = msg.message_annotations() {
        let mut b = builder.message_annotations();
        for (key, value) in annotations.iter() {
            b = b.insert(key.clone(), value.clone());
        }
        builder = b.message_builder();
    }
    if let Some(properties) = msg.application_properties() {
        let mut b = builder.application_properties();
        for (name, value) in properties.iter() {
            b = b.insert(name.clone(), value.clone());
        }
        builder = b.message_builder();
    }
    builder.build()
}

/// A header's JSON value as an AMQP 1.0 simple value (see the module's documentation).
fn simple_value(value: &Value) -> SimpleValue {
    match value {
        Value::Null => SimpleValue::Null,
        Value::Bool(b) => SimpleValue::Boolean(*b),
        Value::String(s) => SimpleValue::from(s.as_str()),
        Value::Number(n) => match (n.as_i64(), n.is_u64(), n.as_f64()) {
            // The protocol crate counts a long of one byte's range one byte too long.
            (Some(i), _, _) if i8::try_from(i).is_ok() => SimpleValue::Int(i as i32),
            (Some(i), _, _) => SimpleValue::Long(i),
            (None, true, _) | (None, false, None) => SimpleValue::String(n.to_string()),
            (None, false, Some(f)) => SimpleValue::Double(f.into()),
        },
        Value::Array(_) | Value::Object(_) => SimpleValue::String(value.to_string()),
    }
}

/// Bytes `msg` adds to a publish frame: its publishing id (8), its length (4) and its
/// encoding. A frame holds [`PUBLISH_FRAME_OVERHEAD`] bytes more than its messages.
pub fn encoded_len(msg: &Message) -> usize {
    8 + 4 + msg.encoded_size() as usize
}

/// Whether `msg` fits in a publish frame of its own when frames may be `max_frame_bytes`
/// long. A message that does not can never be published on a connection with that limit.
pub fn fits_in_frame(msg: &Message, max_frame_bytes: u32) -> bool {
    PUBLISH_FRAME_OVERHEAD + encoded_len(msg) <= max_frame_bytes as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::sample;
    use rabbitmq_stream_protocol::codec::Decoder;
    use std::collections::HashMap;

    /// The message as a consumer reads it: encoded, then decoded.
    fn round_trip(m: &OutboxMessage) -> Message {
        let msg = encode(m).unwrap();
        let mut bytes = Vec::new();
        msg.encode(&mut bytes).unwrap();
        assert_eq!(bytes.len(), msg.encoded_size() as usize);
        let (rest, decoded) = Message::decode(&bytes).unwrap();
        assert!(rest.is_empty());
        decoded
    }

    fn application_properties(msg: &Message) -> HashMap<String, SimpleValue> {
        let props = msg.application_properties().unwrap();
        props.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    #[test]
    fn the_message_carries_the_contract() {
        let mut m = sample(7, Some("a1"));
        m.headers = Some(r#"{"tenant":"t"}"#.into());
        let msg = round_trip(&m);
        assert_eq!(msg.data(), Some(&br#"{"n":1}"#[..]));
        let p = msg.properties().unwrap();
        let message_id = p.message_id.as_ref().map(<&String>::try_from);
        assert_eq!(message_id.unwrap().unwrap(), &m.message_id, "a string message id");
        assert_eq!(p.content_type.as_deref().map(String::as_str), Some(CONTENT_TYPE));
        assert_eq!(p.subject.as_deref(), Some("Tested"));
        let created = chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        assert_eq!(p.creation_time, Some(created.into()));
        assert_eq!(p.user_id, None);
        assert_eq!(p.correlation_id, None);
        assert!(msg.header().is_none());
        assert!(msg.message_annotations().is_none());
        let a = application_properties(&msg);
        assert_eq!(a.len(), 5, "{a:?}");
        assert_eq!(a["tenant"], SimpleValue::from("t"));
        assert_eq!(a["aggregate_type"], SimpleValue::from("thing"));
        assert_eq!(a["aggregate_id"], SimpleValue::from("a1"));
        assert_eq!(a["event_type"], SimpleValue::from("Tested"));
        assert_eq!(a["app_id"], SimpleValue::from("pg_outbox"));
    }

    #[test]
    fn header_values_become_simple_values() {
        let mut m = sample(8, None);
        m.headers = Some(
            r#"{"s":"x","i":-500,"f":1.5,"b":true,"n":null,"a":[1,"y",[false]],"o":{"k":"é","z":{}}}"#.into(),
        );
        let a = application_properties(&round_trip(&m));
        assert_eq!(a["s"], SimpleValue::from("x"));
        assert_eq!(a["i"], SimpleValue::Long(-500));
        assert_eq!(a["f"], SimpleValue::Double(1.5.into()));
        assert_eq!(a["b"], SimpleValue::Boolean(true));
        assert_eq!(a["n"], SimpleValue::Null);
        assert_eq!(a["a"], SimpleValue::from(r#"[1,"y",[false]]"#));
        assert_eq!(a["o"], SimpleValue::from(r#"{"k":"é","z":{}}"#));
        assert!(!a.contains_key("aggregate_id") && !a.contains_key("aggregate_type"));
        assert_eq!(a.len(), 9);
    }

    #[test]
    fn integers_of_one_byte_are_ints() {
        let mut m = sample(8, None);
        m.headers = Some(r#"{"small":-128,"one":1,"big":128,"neg":-129}"#.into());
        // Not decoded: the protocol crate's decoder reads a small int as unsigned.
        let a = application_properties(&encode(&m).unwrap());
        assert_eq!(a["small"], SimpleValue::Int(-128));
        assert_eq!(a["one"], SimpleValue::Int(1));
        assert_eq!(a["big"], SimpleValue::Long(128));
        assert_eq!(a["neg"], SimpleValue::Long(-129));
        let a = application_properties(&round_trip(&m));
        assert_eq!((&a["one"], &a["big"]), (&SimpleValue::Int(1), &SimpleValue::Long(128)));
    }

    #[test]
    fn a_long_event_type_is_left_out_of_the_subject_and_a_long_message_id_refused() {
        let mut m = sample(8, None);
        m.event_type = "e".repeat(176);
        assert_eq!(round_trip(&m).properties().unwrap().subject.as_deref(), Some(&*m.event_type));
        for len in [177, 255] {
            m.event_type = "e".repeat(len);
            let msg = round_trip(&m);
            assert_eq!(msg.properties().unwrap().subject, None);
            assert_eq!(application_properties(&msg)["event_type"], SimpleValue::from(&*m.event_type));
        }
        m.message_id = "i".repeat(213);
        assert!(round_trip(&m).properties().unwrap().message_id.is_some());
        m.message_id = "i".repeat(214);
        assert_eq!(encode(&m).unwrap_err(), EncodeError::MessageIdTooLong { len: 214, max: 213 });
        m.created_at_unix = u64::MAX;
        m.message_id = "i".repeat(221);
        assert!(round_trip(&m).properties().unwrap().creation_time.is_none());
    }

    #[test]
    fn numbers_beyond_i64_become_text() {
        let big: Value = serde_json::from_str("18446744073709551615").unwrap();
        assert_eq!(simple_value(&big), SimpleValue::from("18446744073709551615"));
        let min: Value = serde_json::from_str("-9223372036854775808").unwrap();
        assert_eq!(simple_value(&min), SimpleValue::Long(i64::MIN));
        let float: Value = serde_json::from_str("1e300").unwrap();
        assert_eq!(simple_value(&float), SimpleValue::Double(1e300.into()));
    }

    #[test]
    fn the_event_type_and_sender_win_over_headers_of_their_names() {
        let mut m = sample(9, None);
        m.headers = Some(r#"{"event_type":"Other","app_id":"me"}"#.into());
        let a = application_properties(&round_trip(&m));
        assert_eq!(a["event_type"], SimpleValue::from("Tested"));
        assert_eq!(a["app_id"], SimpleValue::from("pg_outbox"));
        assert_eq!(a.len(), 2);
    }

    #[test]
    fn a_row_publish_would_refuse_is_refused_here_too() {
        for headers in ["[1]", "{", r#"{"big":18446744073709551615}"#, r#"{"aggregate_id":"x"}"#] {
            let mut m = sample(1, Some("a"));
            m.headers = Some(headers.into());
            assert!(matches!(encode(&m), Err(EncodeError::Invalid(InvalidEvent::Headers(_)))), "{headers}");
            assert!(m.envelope("outbox").is_err(), "{headers}");
        }
        let mut m = sample(1, None);
        m.event_type = "e".repeat(256);
        assert!(matches!(encode(&m), Err(EncodeError::Invalid(InvalidEvent::TooLong { .. }))));
    }

    #[test]
    fn giving_a_message_its_publishing_id_changes_nothing_else() {
        let mut m = sample(12, Some("a1"));
        m.headers = Some(r#"{"tenant":"t","n":[1]}"#.into());
        let msg = encode(&m).unwrap();
        assert_eq!(msg.publishing_id(), None);
        let with_id = with_publishing_id(&msg, 42);
        assert_eq!(with_id.publishing_id(), Some(&42));
        // Application properties are a hash map: equal maps may be encoded in another order.
        let decoded = |msg: &Message| {
            let mut bytes = Vec::new();
            msg.encode(&mut bytes).unwrap();
            Message::decode(&bytes).unwrap().1
        };
        assert_eq!(decoded(&msg), decoded(&with_id));
        assert_eq!(encoded_len(&msg), encoded_len(&with_id));
    }

    #[test]
    fn the_length_is_what_goes_on_the_wire() {
        let mut m = sample(10, Some("a1"));
        m.headers = Some(format!(r#"{{"long":"{}","n":1}}"#, "x".repeat(300)));
        m.body = vec![b'7'; 70_000];
        for m in [m, sample(11, None)] {
            let msg = encode(&m).unwrap();
            let mut bytes = Vec::new();
            msg.encode(&mut bytes).unwrap();
            assert_eq!(encoded_len(&msg), 8 + 4 + bytes.len());
            let frame = PUBLISH_FRAME_OVERHEAD + encoded_len(&msg);
            assert!(fits_in_frame(&msg, frame as u32));
            assert!(!fits_in_frame(&msg, frame as u32 - 1));
        }
    }
}
