//! Reading what the broker said: which unconfirmed messages a confirm covers, and which a
//! closed channel or connection is about.

use std::collections::{BTreeMap, HashSet};

/// Removes and returns the sequence numbers a confirm covers, in publish order.
pub(super) fn settle(in_flight: &mut BTreeMap<u64, u64>, tag: u64, multiple: bool) -> Vec<u64> {
    if multiple {
        let rest = in_flight.split_off(&tag.saturating_add(1));
        let covered = std::mem::replace(in_flight, rest);
        covered.into_values().collect()
    } else {
        in_flight.remove(&tag).into_iter().collect()
    }
}

/// Whether a connection close with this AMQP reply code means the broker refused what it was
/// sent (a "hard error" about a frame or a method), rather than going away: 501 frame-error,
/// 502 syntax-error, 503 command-invalid, 504 channel-error, 505 unexpected-frame,
/// 530 not-allowed, 540 not-implemented. Not 320 connection-forced (a shutdown or an operator),
/// 506 resource-error or 541 internal-error (the broker's own trouble), nor 0 (no close from
/// the broker at all).
pub(super) fn is_refusal(code: u16) -> bool {
    matches!(code, 501..=505 | 530 | 540)
}

/// Where a message goes and how big it is: what a close may name.
#[derive(Debug, Clone, Default)]
pub(super) struct Target {
    pub(super) exchange: String,
    pub(super) body_len: usize,
}

/// Who a refusal is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Blame {
    /// These messages, named by the broker's text (or the only one unconfirmed).
    Named(HashSet<u64>),
    /// The text names nothing that matches, and several messages were unconfirmed.
    Unknown,
}

/// Which unconfirmed messages a refusal is about. RabbitMQ names the exchange when it is
/// missing or forbidden ("NOT_FOUND - no exchange 'x' in vhost '/'", "ACCESS_REFUSED - access
/// to exchange 'x' in vhost '/' refused for user 'u'") and the size when a message is too
/// large ("PRECONDITION_FAILED - message size 200 is larger than configured max size 100").
/// When only one message is unconfirmed, it is the one.
pub(super) fn blame<'a>(text: &str, unsettled: impl Iterator<Item = (u64, &'a Target)> + Clone) -> Blame {
    let exchange = quoted_after(text, "exchange '");
    let size = text
        .split("message size ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|digits| digits.parse::<usize>().ok());
    let named: HashSet<u64> = unsettled
        .clone()
        .filter(|(_, t)| exchange.is_some_and(|x| x == t.exchange) || size.is_some_and(|s| s == t.body_len))
        .map(|(i, _)| i)
        .collect();
    if !named.is_empty() {
        return Blame::Named(named);
    }
    let all: HashSet<u64> = unsettled.map(|(i, _)| i).collect();
    if all.len() == 1 {
        Blame::Named(all)
    } else {
        Blame::Unknown
    }
}

fn quoted_after<'t>(text: &'t str, marker: &str) -> Option<&'t str> {
    let start = text.find(marker)? + marker.len();
    let len = text[start..].find('\'')?;
    Some(&text[start..start + len])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targets() -> Vec<Target> {
        vec![
            Target { exchange: "good".into(), body_len: 10 },
            Target { exchange: "missing".into(), body_len: 10 },
            Target { exchange: "good".into(), body_len: 5000 },
        ]
    }

    fn blamed(text: &str, targets: &[Target]) -> Option<Vec<u64>> {
        match blame(text, targets.iter().enumerate().map(|(i, t)| (i as u64, t))) {
            Blame::Named(set) => {
                let mut v: Vec<u64> = set.into_iter().collect();
                v.sort();
                Some(v)
            }
            Blame::Unknown => None,
        }
    }

    #[test]
    fn blames_the_message_the_broker_names() {
        let t = targets();
        assert_eq!(blamed("NOT_FOUND - no exchange 'missing' in vhost '/'", &t), Some(vec![1]));
        assert_eq!(
            blamed("ACCESS_REFUSED - access to exchange 'missing' in vhost '/' refused for user 'u'", &t),
            Some(vec![1])
        );
        assert_eq!(
            blamed("PRECONDITION_FAILED - message size 5000 is larger than configured max size 100", &t),
            Some(vec![2])
        );
        assert_eq!(blamed("INTERNAL_ERROR", &t), None);
        assert_eq!(blamed("NOT_FOUND - no exchange 'other' in vhost '/'", &t), None);
    }

    #[test]
    fn a_lone_unconfirmed_message_is_the_one() {
        let t = &targets()[..1];
        assert_eq!(
            blamed("FRAME_ERROR - type 2, all octets = <<>>: {frame_too_large,1,2}", t),
            Some(vec![0])
        );
        assert_eq!(blamed("anything", &[]), None);
    }

    #[test]
    fn refusals_are_the_brokers_complaints_about_what_it_was_sent() {
        for code in [501, 502, 503, 504, 505, 530, 540] {
            assert!(is_refusal(code), "{code}");
        }
        for code in [0, 200, 320, 402, 403, 404, 406, 506, 541] {
            assert!(!is_refusal(code), "{code}");
        }
    }

    #[test]
    fn settle_covers_multiple_acks() {
        let mut m: BTreeMap<u64, u64> = (1..=5).map(|t| (t, t * 10)).collect();
        assert_eq!(settle(&mut m, 2, false), vec![20]);
        assert_eq!(settle(&mut m, 4, true), vec![10, 30, 40]);
        assert_eq!(settle(&mut m, 9, false), Vec::<u64>::new());
        assert_eq!(settle(&mut m, u64::MAX, true), vec![50]);
        assert!(m.is_empty());
    }
}
