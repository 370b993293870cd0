//! `outbox.amqp_url`: parsing, and the rules that keep its password out of every message.
//!
//! Format (the AMQP URI spec, as RabbitMQ documents it):
//! `amqp://user:password@host:port/vhost?heartbeat=30&connection_timeout=10000`.
//! User, password and vhost are percent-decoded, so the vhost `/` is written `%2F`
//! (`amqp://host/%2F`); a URL without a path, or with a bare `/`, also means the vhost `/`.
//!
//! The setting may name the nodes of one RabbitMQ cluster, separated by commas
//! ([`parse_nodes`]); a comma inside a password is written `%2C`.

use std::fmt;
use std::time::Duration;
use url::Url;

pub const DEFAULT_PORT: u16 = 5672;
/// The port of `amqps://` URLs that name none.
pub const DEFAULT_TLS_PORT: u16 = 5671;
pub const DEFAULT_HEARTBEAT_SECS: u16 = 30;
pub const DEFAULT_CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// A parsed broker address. `Debug` and `Display` never show the password.
#[derive(Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    /// `amqps://`: TLS, with the server's certificate and host name verified (see `tls`).
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub username: String,
    password: String,
    pub vhost: String,
    /// Heartbeat interval the client proposes; 0 disables heartbeats.
    pub heartbeat_secs: u16,
    /// Upper bound for TCP connect plus the AMQP handshake.
    pub connection_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("not a valid URL ({0})")]
    Syntax(String),
    #[error("scheme must be amqp or amqps, not {0:?}")]
    Scheme(String),
    #[error("the URL has no host")]
    NoHost,
    #[error("{0} is not valid UTF-8 after percent-decoding")]
    Encoding(&'static str),
    #[error("query parameter {name:?} has an invalid value {value:?}")]
    QueryValue { name: String, value: String },
    #[error("unknown query parameter {0:?} (known: heartbeat, connection_timeout)")]
    QueryName(String),
    #[error("node {index} of the list: {error}")]
    Node { index: usize, error: Box<UrlError> },
    #[error("the list names no node")]
    NoNodes,
    #[error("the list names more than {MAX_NODES} nodes")]
    TooManyNodes,
    #[error("node {0} repeats an earlier node")]
    Repeated(usize),
}

impl UrlError {
    /// The same error without any text taken from the URL.
    fn hidden(self) -> UrlError {
        match self {
            UrlError::Scheme(_) => UrlError::Scheme("...".into()),
            UrlError::QueryName(_) => UrlError::QueryName("...".into()),
            UrlError::QueryValue { .. } => UrlError::QueryValue { name: "...".into(), value: "...".into() },
            other => other,
        }
    }
}

/// Nodes `outbox.amqp_url` may list.
pub const MAX_NODES: usize = 16;

/// Parses a comma-separated list of the URLs of one cluster's nodes, in the order they are
/// tried. Errors name the node by its position, never by its text (which holds a password).
pub fn parse_nodes(text: &str) -> Result<Vec<BrokerUrl>, UrlError> {
    let parts: Vec<&str> = text.split(',').collect();
    if parts.len() > MAX_NODES {
        return Err(UrlError::TooManyNodes);
    }
    if parts.len() == 1 {
        return BrokerUrl::parse(text).map(|u| vec![u]);
    }
    let mut nodes: Vec<BrokerUrl> = Vec::with_capacity(parts.len());
    for (i, part) in parts.iter().enumerate() {
        if part.trim().is_empty() {
            return Err(UrlError::Node { index: i + 1, error: Box::new(UrlError::NoHost) });
        }
        // A comma that was part of a password splits it: nothing of a node's text is echoed.
        let node = BrokerUrl::parse(part)
            .map_err(|e| UrlError::Node { index: i + 1, error: Box::new(e.hidden()) })?;
        if nodes.iter().any(|n| n.tls == node.tls && n.host == node.host && n.port == node.port) {
            return Err(UrlError::Repeated(i + 1));
        }
        nodes.push(node);
    }
    if nodes.is_empty() {
        return Err(UrlError::NoNodes);
    }
    Ok(nodes)
}

/// The nodes as `SHOW` and the logs print them: without passwords, separated by `, `.
pub fn show_nodes(nodes: &[BrokerUrl]) -> String {
    nodes.iter().map(BrokerUrl::to_string).collect::<Vec<_>>().join(", ")
}

/// Removes every node's password from a text.
pub fn scrub_nodes(nodes: &[BrokerUrl], text: &str) -> String {
    nodes.iter().fold(text.to_string(), |t, n| n.scrub(&t))
}

impl BrokerUrl {
    pub fn parse(text: &str) -> Result<Self, UrlError> {
        // The url crate's error text never echoes the input, so it cannot leak a password.
        let url = Url::parse(text.trim()).map_err(|e| UrlError::Syntax(e.to_string()))?;
        let tls = match url.scheme() {
            "amqp" => false,
            "amqps" => true,
            other => return Err(UrlError::Scheme(other.to_string())),
        };
        let host = match url.host_str() {
            Some(h) if !h.is_empty() => h.trim_start_matches('[').trim_end_matches(']').to_string(),
            _ => return Err(UrlError::NoHost),
        };
        let decode = |s: &str, what: &'static str| percent_decode(s).ok_or(UrlError::Encoding(what));
        let username = if url.username().is_empty() {
            "guest".to_string()
        } else {
            decode(url.username(), "user name")?
        };
        let password = match url.password() {
            Some(p) => decode(p, "password")?,
            None if url.username().is_empty() => "guest".to_string(),
            None => String::new(),
        };
        let path = url.path();
        let vhost = match path {
            "" | "/" => "/".to_string(),
            p => decode(&p[1..], "vhost")?,
        };
        let mut parsed = BrokerUrl {
            tls,
            host,
            port: url.port().unwrap_or(if tls { DEFAULT_TLS_PORT } else { DEFAULT_PORT }),
            username,
            password,
            vhost,
            heartbeat_secs: DEFAULT_HEARTBEAT_SECS,
            connection_timeout: DEFAULT_CONNECTION_TIMEOUT,
        };
        for (name, value) in url.query_pairs() {
            let bad = || UrlError::QueryValue { name: name.to_string(), value: value.to_string() };
            match name.as_ref() {
                "heartbeat" => parsed.heartbeat_secs = value.parse().map_err(|_| bad())?,
                "connection_timeout" => {
                    let ms: u64 = value.parse().map_err(|_| bad())?;
                    if ms == 0 {
                        return Err(bad());
                    }
                    parsed.connection_timeout = Duration::from_millis(ms);
                }
                other => return Err(UrlError::QueryName(other.to_string())),
            }
        }
        Ok(parsed)
    }

    pub fn password(&self) -> &str {
        &self.password
    }

    /// Removes the password from a text that may have picked it up (an error from a library,
    /// a message from the broker). Defensive: nothing we build ever contains it.
    pub fn scrub(&self, text: &str) -> String {
        scrub_secret(text, &self.password)
    }
}

/// Replaces every occurrence of `secret` in `text` by `***`.
pub fn scrub_secret(text: &str, secret: &str) -> String {
    if secret.is_empty() {
        text.to_string()
    } else {
        text.replace(secret, "***")
    }
}

fn percent_decode(s: &str) -> Option<String> {
    percent_encoding::percent_decode_str(s).decode_utf8().ok().map(|v| v.into_owned())
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        let scheme = if self.tls { "amqps" } else { "amqp" };
        write!(f, "{scheme}://{}@{}:{}/", self.username, host, self.port)?;
        if self.vhost == "/" {
            f.write_str("%2F")
        } else {
            f.write_str(&self.vhost)
        }
    }
}

impl fmt::Debug for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BrokerUrl({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_url() {
        let u = BrokerUrl::parse(
            "amqp://app:s%40cret@mq.example:5673/orders?heartbeat=10&connection_timeout=2500",
        )
        .unwrap();
        assert_eq!(u.host, "mq.example");
        assert_eq!(u.port, 5673);
        assert_eq!(u.username, "app");
        assert_eq!(u.password(), "s@cret");
        assert_eq!(u.vhost, "orders");
        assert_eq!(u.heartbeat_secs, 10);
        assert_eq!(u.connection_timeout, Duration::from_millis(2500));
    }

    #[test]
    fn defaults_and_vhost_rules() {
        let u = BrokerUrl::parse("amqp://localhost").unwrap();
        assert_eq!(
            (u.port, u.username.as_str(), u.password(), u.vhost.as_str()),
            (5672, "guest", "guest", "/")
        );
        assert_eq!(BrokerUrl::parse("amqp://h/").unwrap().vhost, "/");
        assert_eq!(BrokerUrl::parse("amqp://h/%2F").unwrap().vhost, "/");
        assert_eq!(BrokerUrl::parse("amqp://h/%2fprod").unwrap().vhost, "/prod");
        assert_eq!(BrokerUrl::parse("amqp://h/a+b").unwrap().vhost, "a+b");
        assert_eq!(BrokerUrl::parse("amqp://u@h").unwrap().password(), "");
        assert_eq!(BrokerUrl::parse("amqp://[::1]:5000").unwrap().host, "::1");
    }

    #[test]
    fn amqps_means_tls_on_5671_unless_a_port_is_given() {
        let u = BrokerUrl::parse("amqps://app:pw@mq.example/%2F").unwrap();
        assert!(u.tls);
        assert_eq!(u.port, 5671);
        assert_eq!(u.to_string(), "amqps://app@mq.example:5671/%2F");
        assert_eq!(BrokerUrl::parse("amqps://h:6000").unwrap().port, 6000);
        assert!(!BrokerUrl::parse("amqp://h").unwrap().tls);
    }

    #[test]
    fn rejects_what_it_cannot_use() {
        assert!(matches!(BrokerUrl::parse("http://h"), Err(UrlError::Scheme(_))));
        assert!(matches!(BrokerUrl::parse("amqpx://h"), Err(UrlError::Scheme(_))));
        assert!(matches!(BrokerUrl::parse("not a url"), Err(UrlError::Syntax(_))));
        assert!(matches!(BrokerUrl::parse("amqp://h?heartbeat=x"), Err(UrlError::QueryValue { .. })));
        assert!(matches!(
            BrokerUrl::parse("amqp://h?connection_timeout=0"),
            Err(UrlError::QueryValue { .. })
        ));
        assert!(matches!(BrokerUrl::parse("amqp://h?frame_max=1"), Err(UrlError::QueryName(_))));
    }

    #[test]
    fn a_list_names_the_nodes_of_one_cluster_in_order() {
        let nodes = parse_nodes("amqp://a:pa@n1:5672/%2F, amqps://b:pb@n2/v ,amqp://n3").unwrap();
        assert_eq!(nodes.iter().map(|n| n.host.as_str()).collect::<Vec<_>>(), ["n1", "n2", "n3"]);
        assert_eq!(nodes[1].port, 5671);
        assert_eq!(show_nodes(&nodes), "amqp://a@n1:5672/%2F, amqps://b@n2:5671/v, amqp://guest@n3:5672/%2F");
        assert_eq!(scrub_nodes(&nodes, "pa and pb"), "*** and ***");
        assert_eq!(parse_nodes("amqp://h").unwrap().len(), 1);
        assert_eq!(parse_nodes("amqp://u:a%2Cb@h").unwrap()[0].password(), "a,b");
    }

    #[test]
    fn a_bad_list_is_refused_by_position_without_its_text() {
        let err = parse_nodes("amqp://u:hunter2@h1, http://u:hunter2@h2").unwrap_err();
        assert!(matches!(&err, UrlError::Node { index: 2, .. }), "{err:?}");
        assert!(!err.to_string().contains("hunter2"), "{err}");
        // A raw comma in a password: the part after it is not echoed.
        let err = parse_nodes("amqp://u:123,secret:x@h").unwrap_err().to_string();
        assert!(!err.contains("secret"), "{err}");
        assert!(matches!(parse_nodes("amqp://h1,"), Err(UrlError::Node { index: 2, .. })));
        assert!(matches!(parse_nodes("amqp://h1, amqp://h1:5672"), Err(UrlError::Repeated(2))));
        assert!(parse_nodes("amqp://h1:5672, amqp://h1:5673").is_ok());
        let many = vec!["amqp://h"; MAX_NODES + 1].join(",");
        assert!(matches!(parse_nodes(&many), Err(UrlError::TooManyNodes)));
    }

    #[test]
    fn password_never_displayed() {
        let text = "amqp://app:hunter2secret@h:5672/v";
        let u = BrokerUrl::parse(text).unwrap();
        for shown in [format!("{u}"), format!("{u:?}")] {
            assert!(!shown.contains("hunter2secret"), "{shown}");
        }
        assert_eq!(u.to_string(), "amqp://app@h:5672/v");
        assert_eq!(u.scrub("auth failed for hunter2secret"), "auth failed for ***");
        for bad in [
            "amqpz://app:hunter2secret@h",
            "amqp://app:hunter2secret@h?x=1",
            "amqp://app:hunter2secret@h?heartbeat=z",
        ] {
            let err = BrokerUrl::parse(bad).unwrap_err().to_string();
            assert!(!err.contains("hunter2secret"), "{err}");
        }
    }
}
