//! The address of RabbitMQ's stream port: parsing, and the rules that keep its password out of
//! every message.
//!
//! Format: `rabbitmq-stream://user:password@host:port/vhost`. User, password and vhost are
//! percent-decoded, so the vhost `/` is written `%2F`; a URL without a path, or with a bare
//! `/`, also means the vhost `/`. Without user and password the user is `guest` (password
//! `guest`); a user without a password has an empty one. The port is 5552 unless given.
//! `rabbitmq-stream+tls://` is refused: TLS to the stream port is not supported yet. No query
//! parameter is known, so a URL with one is refused.

use std::fmt;
use url::Url;

pub const SCHEME: &str = "rabbitmq-stream";
/// The stream port RabbitMQ listens on unless configured otherwise.
pub const DEFAULT_PORT: u16 = 5552;
/// What [`StreamUrl::scrub`] and `Debug` put in place of the password.
pub const HIDDEN: &str = "********";

/// A parsed stream address. `Debug` and [`StreamUrl::shown`] never show the password.
#[derive(Clone, PartialEq, Eq)]
pub struct StreamUrl {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub vhost: String,
}

/// What is percent-encoded when a user name or a vhost is shown, so that the text parses back.
const SHOWN_ENCODED: &percent_encoding::AsciiSet =
    &percent_encoding::CONTROLS.add(b'%').add(b'/').add(b'@').add(b':').add(b'?').add(b'#').add(b' ');

impl StreamUrl {
    /// Parses a `rabbitmq-stream://` URL. Error messages never contain the password.
    pub fn parse(text: &str) -> Result<StreamUrl, String> {
        // The url crate's error text never echoes the input, so it cannot leak a password.
        let url = Url::parse(text.trim()).map_err(|e| format!("not a valid URL ({e})"))?;
        // Anything taken from the URL that might hold the password is scrubbed with it, raw
        // and decoded.
        let raw_password = url.password().unwrap_or_default().to_string();
        let decoded_password = percent_decode(&raw_password).unwrap_or_default();
        Self::parse_url(&url).map_err(|e| hide(&hide(&e, &raw_password), &decoded_password))
    }

    fn parse_url(url: &Url) -> Result<StreamUrl, String> {
        match url.scheme() {
            SCHEME => {}
            "rabbitmq-stream+tls" => {
                return Err("TLS to the stream port is not supported yet (rabbitmq-stream+tls)".into())
            }
            other => return Err(format!("scheme must be {SCHEME}, not {other:?}")),
        }
        let host = match url.host_str() {
            Some(h) if !h.is_empty() => h.trim_start_matches('[').trim_end_matches(']').to_string(),
            _ => return Err("the URL has no host".into()),
        };
        let decode = |s: &str, what: &str| {
            percent_decode(s).ok_or(format!("{what} is not valid UTF-8 after decoding"))
        };
        let user =
            if url.username().is_empty() { "guest".to_string() } else { decode(url.username(), "user")? };
        let password = match url.password() {
            Some(p) => decode(p, "password")?,
            None if url.username().is_empty() => "guest".to_string(),
            None => String::new(),
        };
        let vhost = match url.path() {
            "" | "/" => "/".to_string(),
            p => decode(p.strip_prefix('/').unwrap_or(p), "vhost")?,
        };
        if let Some((name, _)) = url.query_pairs().next() {
            return Err(format!("unknown query parameter {name:?} (a stream URL takes none)"));
        }
        if url.fragment().is_some() {
            return Err("a stream URL takes no fragment (#...)".into());
        }
        Ok(StreamUrl { host, port: url.port().unwrap_or(DEFAULT_PORT), user, password, vhost })
    }

    /// The URL without its password: `rabbitmq-stream://user@host:port/vhost`, the vhost
    /// percent-encoded (`/` is `%2F`).
    pub fn shown(&self) -> String {
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        let encode = |s: &str| percent_encoding::utf8_percent_encode(s, SHOWN_ENCODED).to_string();
        format!("{SCHEME}://{}@{host}:{}/{}", encode(&self.user), self.port, encode(&self.vhost))
    }

    /// Replaces every occurrence of the password (when it is not empty) in a text that may
    /// have picked it up (an error from the client library, a message from the broker) by
    /// [`HIDDEN`]. Defensive: nothing we build ever contains it.
    pub fn scrub(&self, text: &str) -> String {
        hide(text, &self.password)
    }
}

fn hide(text: &str, secret: &str) -> String {
    if secret.is_empty() {
        text.to_string()
    } else {
        text.replace(secret, HIDDEN)
    }
}

fn percent_decode(s: &str) -> Option<String> {
    percent_encoding::percent_decode_str(s).decode_utf8().ok().map(|v| v.into_owned())
}

impl fmt::Debug for StreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamUrl")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &HIDDEN)
            .field("vhost", &self.vhost)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(host: &str, port: u16, user: &str, password: &str, vhost: &str) -> StreamUrl {
        StreamUrl {
            host: host.into(),
            port,
            user: user.into(),
            password: password.into(),
            vhost: vhost.into(),
        }
    }

    #[test]
    fn full_url() {
        assert_eq!(
            StreamUrl::parse(" rabbitmq-stream://app:s%40cret@mq.example:5553/orders ").unwrap(),
            url("mq.example", 5553, "app", "s@cret", "orders")
        );
    }

    #[test]
    fn defaults_and_vhost_rules() {
        assert_eq!(
            StreamUrl::parse("rabbitmq-stream://localhost").unwrap(),
            url("localhost", 5552, "guest", "guest", "/")
        );
        let vhost = |text: &str| StreamUrl::parse(text).unwrap().vhost;
        assert_eq!(vhost("rabbitmq-stream://h/"), "/");
        assert_eq!(vhost("rabbitmq-stream://h/%2F"), "/");
        assert_eq!(vhost("rabbitmq-stream://h/%2fprod"), "/prod");
        assert_eq!(vhost("rabbitmq-stream://h/a+b"), "a+b");
        assert_eq!(vhost("rabbitmq-stream://h/caf%C3%A9"), "café");
        assert_eq!(StreamUrl::parse("rabbitmq-stream://u@h").unwrap().password, "");
        assert_eq!(StreamUrl::parse("rabbitmq-stream://u@h").unwrap().user, "u");
        assert_eq!(StreamUrl::parse("rabbitmq-stream://[::1]:6000").unwrap().host, "::1");
        assert_eq!(StreamUrl::parse("rabbitmq-stream://h?").unwrap().port, 5552);
    }

    #[test]
    fn rejects_what_it_cannot_use() {
        let err = |text: &str| StreamUrl::parse(text).unwrap_err();
        assert!(err("rabbitmq-stream+tls://h").contains("TLS to the stream port is not supported yet"));
        assert!(err("amqp://h").contains("scheme must be rabbitmq-stream"), "{}", err("amqp://h"));
        assert!(err("rabbitmq-streams://h").contains("scheme"));
        assert!(err("not a url").contains("not a valid URL"));
        assert!(err("rabbitmq-stream://h?heartbeat=10").contains("unknown query parameter \"heartbeat\""));
        assert!(err("rabbitmq-stream://h#x").contains("fragment"));
        assert!(err("rabbitmq-stream:///v").contains("no host"), "{}", err("rabbitmq-stream:///v"));
        assert!(err("rabbitmq-stream://h/%FF").contains("vhost"));
    }

    #[test]
    fn shown_has_no_password_and_parses_back() {
        let u = StreamUrl::parse("rabbitmq-stream://app:hunter2@h:5552/%2F").unwrap();
        assert_eq!(u.shown(), "rabbitmq-stream://app@h:5552/%2F");
        let odd = url("::1", 7000, "a@b", "pw", "/x y");
        assert_eq!(odd.shown(), "rabbitmq-stream://a%40b@[::1]:7000/%2Fx%20y");
        let back = StreamUrl::parse(&odd.shown()).unwrap();
        assert_eq!((back.host, back.port, back.user, back.vhost), (odd.host, odd.port, odd.user, odd.vhost));
    }

    #[test]
    fn password_never_displayed() {
        let u = StreamUrl::parse("rabbitmq-stream://app:hunter2secret@h:5552/v").unwrap();
        for shown in [u.shown(), format!("{u:?}")] {
            assert!(!shown.contains("hunter2secret"), "{shown}");
        }
        assert!(format!("{u:?}").contains(HIDDEN));
        assert_eq!(u.scrub("auth failed for hunter2secret"), "auth failed for ********");
        assert_eq!(url("h", 1, "u", "", "/").scrub("nothing to hide"), "nothing to hide");
        for bad in [
            "rabbitmq-stream+tls://app:hunter2secret@h",
            "amqp://app:hunter2secret@h",
            "rabbitmq-stream://app:hunter2secret@h?hunter2secret=1",
            "rabbitmq-stream://app:hunter2secret@h?x=1#hunter2secret",
            "rabbitmq-stream://app:hunter%32secret@h?hunter2secret",
        ] {
            let err = StreamUrl::parse(bad).unwrap_err();
            assert!(!err.contains("hunter2secret") && !err.contains("hunter%32"), "{err}");
        }
    }
}
