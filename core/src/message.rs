//! An outbox row as the worker reads it, and the AMQP message it becomes.

use crate::headers;
use crate::validate::{check_short_str, InvalidEvent};
use amqprs::{BasicProperties, DELIVERY_MODE_PERSISTENT};

pub const CONTENT_TYPE: &str = "application/json";
pub const APP_ID: &str = "pg_outbox";

/// One row of `outbox.messages`, as read by the worker.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxMessage {
    /// `outbox.messages.id`: the row, used to delete or update it after the outcome is known.
    pub row_id: i64,
    /// The uuid `outbox.publish` returned; stable across retries and replays.
    pub message_id: String,
    pub event_type: String,
    /// The payload's JSON text, sent as the body.
    pub body: Vec<u8>,
    pub aggregate_type: Option<String>,
    pub aggregate_id: Option<String>,
    /// The headers object's JSON text.
    pub headers: Option<String>,
    pub routing_key: Option<String>,
    pub exchange: Option<String>,
    /// When the event was written, in seconds since the Unix epoch (AMQP timestamps are seconds).
    pub created_at_unix: u64,
    /// Failed attempts so far.
    pub attempts: i32,
}

/// Where and what to publish.
#[derive(Debug, Clone)]
pub struct Envelope {
    pub exchange: String,
    pub routing_key: String,
    pub properties: BasicProperties,
    /// Bytes of the content header frame that carries the properties. It must fit in one
    /// frame (`frame_max`); the body is split into as many frames as it needs.
    pub header_frame_len: usize,
}

/// Bytes of the content header frame of a message with these properties: the frame's own 8
/// (type, channel, size, end), class, weight and body size (12), the property flags (2), and
/// the properties every message carries: message id, type, content type, delivery mode,
/// timestamp, app id, and the headers when there are any. AMQP 0-9-1 requires the whole frame
/// to fit in `frame_max`; RabbitMQ closes the connection (501 FRAME_ERROR) otherwise.
pub fn header_frame_len(
    message_id_len: usize,
    event_type_len: usize,
    headers_encoded_len: Option<usize>,
) -> usize {
    let short = |len: usize| 1 + len;
    8 + 12
        + 2
        + short(message_id_len)
        + short(event_type_len)
        + short(CONTENT_TYPE.len())
        + 1
        + 8
        + short(APP_ID.len())
        + headers_encoded_len.unwrap_or(0)
}

/// The key that orders events: events with the same key are published in commit order.
/// Events without an aggregate id have none and are unordered.
pub type OrderingKey = (Option<String>, String);

/// Which of `publishers` publishes the events of an aggregate: always the same one (so its
/// order and the one-unconfirmed-per-aggregate rule hold within one publisher). Events
/// without an aggregate are spread by row ([`OutboxMessage::publisher`]). Pure, and stable
/// within a process (SipHash with fixed keys).
pub fn publisher_for(aggregate_type: &Option<String>, aggregate_id: &str, publishers: usize) -> usize {
    use std::hash::{Hash, Hasher};
    if publishers <= 1 {
        return 0;
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    aggregate_type.hash(&mut h);
    aggregate_id.hash(&mut h);
    (h.finish() % publishers as u64) as usize
}

impl OutboxMessage {
    pub fn ordering_key(&self) -> Option<OrderingKey> {
        self.aggregate_id.as_ref().map(|id| (self.aggregate_type.clone(), id.clone()))
    }

    /// Which of `publishers` publishes this message: see [`publisher_for`].
    pub fn publisher(&self, publishers: usize) -> usize {
        match &self.aggregate_id {
            Some(id) => publisher_for(&self.aggregate_type, id, publishers),
            None if publishers <= 1 => 0,
            None => self.row_id.rem_euclid(publishers as i64) as usize,
        }
    }

    /// The AMQP envelope of this message. Fails for a row that `outbox.publish` would have
    /// refused (written to the table by hand, say): such a row can never be published.
    pub fn envelope(&self, default_exchange: &str) -> Result<Envelope, InvalidEvent> {
        let exchange = self.exchange.as_deref().unwrap_or(default_exchange);
        let routing_key = self.routing_key.as_deref().unwrap_or(&self.event_type);
        check_short_str("exchange", exchange)?;
        check_short_str("routing_key", routing_key)?;
        check_short_str("event_type", &self.event_type)?;
        check_short_str("message_id", &self.message_id)?;
        let headers = headers::build(
            self.headers.as_deref(),
            self.aggregate_type.as_deref(),
            self.aggregate_id.as_deref(),
        )?;
        let has_headers = !headers.table.as_ref().is_empty();
        let header_frame_len = header_frame_len(
            self.message_id.len(),
            self.event_type.len(),
            has_headers.then_some(headers.encoded_len),
        );
        let mut properties = BasicProperties::default();
        properties
            .with_message_id(&self.message_id)
            .with_message_type(&self.event_type)
            .with_content_type(CONTENT_TYPE)
            .with_delivery_mode(DELIVERY_MODE_PERSISTENT)
            .with_timestamp(self.created_at_unix)
            .with_app_id(APP_ID);
        if has_headers {
            properties.with_headers(headers.table);
        }
        Ok(Envelope {
            exchange: exchange.to_string(),
            routing_key: routing_key.to_string(),
            properties: properties.finish(),
            header_frame_len,
        })
    }
}

#[cfg(test)]
pub(crate) fn sample(row_id: i64, aggregate: Option<&str>) -> OutboxMessage {
    OutboxMessage {
        row_id,
        message_id: format!("00000000-0000-7000-8000-{row_id:012}"),
        event_type: "Tested".into(),
        body: br#"{"n":1}"#.to_vec(),
        aggregate_type: aggregate.map(|_| "thing".to_string()),
        aggregate_id: aggregate.map(str::to_string),
        headers: None,
        routing_key: None,
        exchange: None,
        created_at_unix: 1_700_000_000,
        attempts: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_carries_the_contract() {
        let mut m = sample(7, Some("a1"));
        m.headers = Some(r#"{"tenant":"t"}"#.into());
        let e = m.envelope("outbox").unwrap();
        assert_eq!(e.exchange, "outbox");
        assert_eq!(e.routing_key, "Tested");
        let p = &e.properties;
        assert_eq!(p.message_id().unwrap(), &m.message_id);
        assert_eq!(p.message_type().unwrap(), "Tested");
        assert_eq!(p.content_type().unwrap(), CONTENT_TYPE);
        assert_eq!(p.delivery_mode(), Some(DELIVERY_MODE_PERSISTENT));
        assert_eq!(p.timestamp(), Some(1_700_000_000));
        let h = p.headers().unwrap();
        for k in ["tenant", "aggregate_type", "aggregate_id"] {
            assert!(h.get(&k.try_into().unwrap()).is_some(), "{k}");
        }
    }

    #[test]
    fn the_header_frame_length_is_what_goes_on_the_wire() {
        let mut m = sample(7, Some("a1"));
        m.headers =
            Some(r#"{"s":"x","i":-5,"f":1.5,"b":true,"n":null,"a":[1,"y",[false]],"o":{"k":"é"}}"#.into());
        for m in [m.clone(), sample(8, None)] {
            let e = m.envelope("outbox").unwrap();
            let properties = amqp_serde::to_bytes(&e.properties).unwrap();
            // frame header 7 + class, weight, body size 12 + properties (flags included) + end 1
            assert_eq!(e.header_frame_len, 7 + 12 + properties.len() + 1, "{m:?}");
        }
    }

    #[test]
    fn arguments_override_defaults() {
        let mut m = sample(1, None);
        m.exchange = Some("ex".into());
        m.routing_key = Some("rk".into());
        let e = m.envelope("outbox").unwrap();
        assert_eq!((e.exchange.as_str(), e.routing_key.as_str()), ("ex", "rk"));
        assert!(e.properties.headers().is_none());
        assert_eq!(m.ordering_key(), None);
        assert_eq!(sample(1, Some("x")).ordering_key(), Some((Some("thing".into()), "x".into())));
    }

    #[test]
    fn an_aggregate_always_goes_through_the_same_publisher() {
        let mut counts = [0usize; 4];
        for i in 0..1000 {
            let m = sample(i, Some(&format!("agg-{}", i % 100)));
            let p = m.publisher(4);
            assert_eq!(p, sample(i + 5000, Some(&format!("agg-{}", i % 100))).publisher(4));
            counts[p] += 1;
        }
        assert!(counts.iter().all(|c| *c >= 100), "spread over all four: {counts:?}");
        assert_eq!(
            (0..8).map(|i| sample(i, None).publisher(4)).collect::<Vec<_>>(),
            [0, 1, 2, 3, 0, 1, 2, 3]
        );
        assert_eq!(sample(3, Some("x")).publisher(1), 0);
        let m = sample(9, Some("agg-7"));
        let (t, id) = m.ordering_key().unwrap();
        assert_eq!(publisher_for(&t, &id, 4), m.publisher(4), "a release finds the same publisher");
    }

    #[test]
    fn a_row_publish_would_refuse_is_not_publishable() {
        let mut m = sample(1, None);
        m.routing_key = Some("r".repeat(300));
        assert!(m.envelope("outbox").is_err());
        let mut m = sample(1, None);
        m.headers = Some("[1]".into());
        assert!(m.envelope("outbox").is_err());
    }
}
