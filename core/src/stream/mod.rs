//! Publishing to RabbitMQ streams over the stream protocol, for events whose exchange is
//! `stream:<name>`: exactly once, by the broker's deduplication.
//!
//! Each stream gets its own connection ([`StreamLink`]) with one named publisher, the
//! *producer* ([`producer_name`]). The broker remembers the highest publishing id it stored for
//! a producer on a stream and drops (while still confirming) any message whose id is not
//! higher. So a link first asks for that id ([`Report::Ready`]), and the caller gives every
//! message an id that only ever grows; re-sending after a lost connection or a crash cannot
//! store a message twice.
//!
//! - [`url`]: the `rabbitmq-stream://` address;
//! - [`message`]: an outbox row as an AMQP 1.0 message (the mapping is documented there);
//! - [`link`]: one stream's connection, its publisher and its confirms.
//!
//! Only the raw `Client` of `rabbitmq-stream-client` 0.4.4 is used (see core/Cargo.toml for why
//! that version); its `Producer` is not, as its confirm handling cannot take an id it did not
//! send.

mod handler;
pub mod link;
pub mod message;
pub mod url;

pub use link::{LinkConfig, Report, StreamLink, DEFAULT_MAX_FRAME_BYTES};
pub use message::{encode, encoded_len, fits_in_frame, EncodeError, PUBLISH_FRAME_OVERHEAD};
/// The AMQP 1.0 message [`encode`] makes and [`StreamLink::publish`] takes.
pub use rabbitmq_stream_protocol::message::Message;
pub use url::StreamUrl;

/// What an exchange name starts with when it names a stream.
pub const PREFIX: &str = "stream:";

/// Stream names are AMQP short strings (they are queue names): at most this many bytes.
pub const STREAM_NAME_MAX: usize = 255;

/// The stream an exchange name stands for: `"stream:orders"` → `Some("orders")`. `None` for an
/// ordinary exchange, and for `"stream:"` alone, which names no stream.
pub fn stream_of(exchange: &str) -> Option<&str> {
    exchange.strip_prefix(PREFIX).filter(|name| !name.is_empty())
}

/// Checks a stream's name: 1 to 255 bytes, no control characters.
pub fn check_stream_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("a stream name must not be empty".into());
    }
    if name.len() > STREAM_NAME_MAX {
        return Err(format!("stream name is {} bytes long; RabbitMQ allows at most 255", name.len()));
    }
    if name.chars().any(char::is_control) {
        return Err("a stream name must not contain control characters".into());
    }
    Ok(())
}

/// The longest producer name the client can send: its query of a publisher's sequence refuses
/// a longer one (the broker itself would take it).
pub const PRODUCER_NAME_MAX: usize = 255;

/// The name of the producer that publishes a database's events to a stream:
/// `pg_outbox/<database>/<stream>`. It must stay the same across restarts and upgrades: the
/// broker keys its deduplication on it.
///
/// A name longer than [`PRODUCER_NAME_MAX`] bytes (a long database name with a long stream
/// name) is cut on a character boundary and ends with `~` and the 64-bit FNV-1a hash of the
/// whole name in hex, so that two cut names stay apart; FNV-1a is fixed, unlike std's hasher.
pub fn producer_name(database: &str, stream: &str) -> String {
    let name = format!("pg_outbox/{database}/{stream}");
    if name.len() <= PRODUCER_NAME_MAX {
        return name;
    }
    let hash =
        name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    let mut cut = PRODUCER_NAME_MAX - 17;
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}~{hash:016x}", &name[..cut])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exchange_names_a_stream_by_its_prefix() {
        assert_eq!(stream_of("stream:orders"), Some("orders"));
        assert_eq!(stream_of("stream:a:b"), Some("a:b"));
        assert_eq!(stream_of("stream:"), None);
        assert_eq!(stream_of("orders"), None);
        assert_eq!(stream_of("Stream:orders"), None);
        assert_eq!(stream_of(""), None);
    }

    #[test]
    fn stream_names_are_short_strings_without_control_characters() {
        assert_eq!(check_stream_name("orders"), Ok(()));
        assert_eq!(check_stream_name(&"é".repeat(127)), Ok(()));
        assert!(check_stream_name("").is_err());
        assert!(check_stream_name(&"s".repeat(256)).unwrap_err().contains("256 bytes"));
        assert!(check_stream_name(&"é".repeat(128)).is_err());
        assert!(check_stream_name("a\nb").is_err());
        assert!(check_stream_name("a\u{7f}").is_err());
    }

    #[test]
    fn a_producer_is_named_after_its_database_and_stream() {
        assert_eq!(producer_name("shop", "orders"), "pg_outbox/shop/orders");
        let fits = "s".repeat(255 - "pg_outbox/shop/".len());
        assert_eq!(producer_name("shop", &fits), format!("pg_outbox/shop/{fits}"));
        let long = producer_name(&"d".repeat(63), &"s".repeat(255));
        assert_eq!(long.len(), 255);
        assert!(long.starts_with("pg_outbox/ddd") && long.as_bytes()[238] == b'~', "{long}");
        assert_eq!(long, producer_name(&"d".repeat(63), &"s".repeat(255)), "stable");
        assert_ne!(long, producer_name(&"d".repeat(63), &format!("{}t", "s".repeat(254))));
        // FNV-1a 64 of a known text (checked elsewhere), so the hash can never silently change.
        let known = producer_name("db", &"é".repeat(200));
        assert!(known.len() <= 255 && known.ends_with("~944604c27286851c"), "{known}");
    }
}
