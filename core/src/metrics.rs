//! What the worker counts for monitoring, in a shape that lives in shared memory (fixed size,
//! plain data), and the Prometheus text exposition format it is read in.

use std::fmt::Write as _;

/// Upper bounds of the latency histograms' buckets, in microseconds: 0.5 ms to 60 s.
pub const BUCKETS_US: [i64; 16] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
    5_000_000, 10_000_000, 30_000_000, 60_000_000,
];

/// A latency histogram: counts per bucket (the last one above 60 s), their sum and count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Histogram {
    counts: [u64; BUCKETS_US.len() + 1],
    sum_us: u64,
}

impl Histogram {
    /// One observation, in microseconds (a negative one, from clocks that disagree, is 0).
    pub fn observe(&mut self, us: i64) {
        let us = us.max(0);
        let bucket = BUCKETS_US.iter().position(|b| us <= *b).unwrap_or(BUCKETS_US.len());
        self.counts[bucket] += 1;
        self.sum_us = self.sum_us.saturating_add(us as u64);
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    pub fn sum_seconds(&self) -> f64 {
        self.sum_us as f64 / 1e6
    }

    /// Cumulative counts by upper bound in seconds, as Prometheus wants them (`le`), ending
    /// with `+Inf`.
    pub fn cumulative(&self) -> Vec<(String, u64)> {
        let mut total = 0;
        let mut out = Vec::with_capacity(self.counts.len());
        for (i, count) in self.counts.iter().enumerate() {
            total += count;
            let le = match BUCKETS_US.get(i) {
                Some(us) => format_value(*us as f64 / 1e6),
                None => "+Inf".to_string(),
            };
            out.push((le, total));
        }
        out
    }
}

/// Exchanges counted one by one; events to further exchanges are counted under [`OTHER`].
pub const MAX_EXCHANGES: usize = 16;
/// Bytes of an exchange's name kept (a longer name is cut at a character boundary).
pub const EXCHANGE_NAME_BYTES: usize = 128;
/// The label of the exchanges beyond the first [`MAX_EXCHANGES`] - 1.
pub const OTHER: &str = "(other)";

/// Totals of one exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExchangeTotals {
    name: [u8; EXCHANGE_NAME_BYTES],
    name_len: u8,
    pub used: bool,
    pub published: u64,
    pub failed_attempts: u64,
    pub dead_lettered: u64,
}

impl Default for ExchangeTotals {
    fn default() -> Self {
        ExchangeTotals {
            name: [0; EXCHANGE_NAME_BYTES],
            name_len: 0,
            used: false,
            published: 0,
            failed_attempts: 0,
            dead_lettered: 0,
        }
    }
}

impl ExchangeTotals {
    pub fn name(&self) -> &str {
        std::str::from_utf8(&self.name[..self.name_len as usize]).unwrap_or(OTHER)
    }
}

/// What happened to an event, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    Published,
    FailedAttempt,
    DeadLettered,
}

/// Everything one database's worker counts. Counters only grow (from server start); the
/// gauges are set by the worker as it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Metrics {
    pub exchanges: [ExchangeTotals; MAX_EXCHANGES],
    /// From an event's commit to the broker's confirm.
    pub commit_to_confirm: Histogram,
    /// From an event's commit to its first hand-over to a publisher.
    pub wait: Histogram,
    /// Connections to the broker opened, and attempts that failed.
    pub connections: u64,
    pub connect_failures: u64,
    /// Gauges: events handed to publishers and not yet settled; events waiting for a retry.
    pub in_flight: i64,
    pub retrying: i64,
}

fn cut(name: &str) -> &str {
    let mut end = name.len().min(EXCHANGE_NAME_BYTES);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

impl Metrics {
    /// What a worker that starts again keeps: everything but what it had in flight.
    pub fn restarted(&self) -> Metrics {
        Metrics { in_flight: 0, ..*self }
    }

    /// Counts `n` events of `exchange` (the name the broker sees; `""` is the default
    /// exchange).
    pub fn count(&mut self, exchange: &str, what: Counted, n: u64) {
        let name = cut(exchange);
        let slot = match self.exchanges.iter().position(|e| e.used && e.name() == name) {
            Some(i) => i,
            None => match self.exchanges[..MAX_EXCHANGES - 1].iter().position(|e| !e.used) {
                Some(i) => {
                    let e = &mut self.exchanges[i];
                    e.used = true;
                    e.name[..name.len()].copy_from_slice(name.as_bytes());
                    e.name_len = name.len() as u8;
                    i
                }
                None => {
                    let e = &mut self.exchanges[MAX_EXCHANGES - 1];
                    if !e.used {
                        e.used = true;
                        e.name[..OTHER.len()].copy_from_slice(OTHER.as_bytes());
                        e.name_len = OTHER.len() as u8;
                    }
                    MAX_EXCHANGES - 1
                }
            },
        };
        let e = &mut self.exchanges[slot];
        match what {
            Counted::Published => e.published += n,
            Counted::FailedAttempt => e.failed_attempts += n,
            Counted::DeadLettered => e.dead_lettered += n,
        }
    }

    /// The exchanges counted so far, in the order first seen.
    pub fn exchanges(&self) -> impl Iterator<Item = &ExchangeTotals> {
        self.exchanges.iter().filter(|e| e.used)
    }
}

/// One sample of the exposition: a metric's name, its labels and its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    /// `histogram`, `counter` or `gauge`.
    pub kind: String,
    pub help: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// The family a sample belongs to: its name without a histogram's `_bucket`, `_sum`, `_count`.
fn family(sample: &Sample) -> &str {
    if sample.kind == "histogram" {
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = sample.name.strip_suffix(suffix) {
                return base;
            }
        }
    }
    &sample.name
}

/// A value as Prometheus writes it: integers without a fraction, `+Inf`, `-Inf`, `NaN`.
pub fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

fn escape_label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn escape_help(help: &str) -> String {
    help.replace('\\', "\\\\").replace('\n', "\\n")
}

/// The Prometheus text exposition format (version 0.0.4) of `samples`: one `# HELP` and
/// `# TYPE` line per family, then its samples (families in the order first seen, each family's
/// samples together, as the format requires).
pub fn exposition(samples: &[Sample]) -> String {
    let mut families: Vec<&str> = Vec::new();
    for s in samples {
        if !families.contains(&family(s)) {
            families.push(family(s));
        }
    }
    let mut out = String::new();
    for fam in families {
        let mut members = samples.iter().filter(|s| family(s) == fam).peekable();
        if let Some(first) = members.peek() {
            let _ = writeln!(out, "# HELP {fam} {}", escape_help(&first.help));
            let _ = writeln!(out, "# TYPE {fam} {}", first.kind);
        }
        for s in members {
            sample_line(&mut out, s);
        }
    }
    out
}

fn sample_line(out: &mut String, s: &Sample) {
    {
        out.push_str(&s.name);
        if !s.labels.is_empty() {
            out.push('{');
            for (i, (k, v)) in s.labels.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                let _ = write!(out, "{k}=\"{}\"", escape_label(v));
            }
            out.push('}');
        }
        let _ = writeln!(out, " {}", format_value(s.value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_their_bucket_and_add_up() {
        let mut h = Histogram::default();
        for us in [0, 500, 501, 59_000_000, 61_000_000, -5] {
            h.observe(us);
        }
        let c = h.cumulative();
        assert_eq!(c.len(), 17);
        assert_eq!(c[0], ("0.0005".to_string(), 3), "0, 500 and the negative one");
        assert_eq!(c[1], ("0.001".to_string(), 4));
        assert_eq!(c[15], ("60".to_string(), 5));
        assert_eq!(c[16], ("+Inf".to_string(), 6));
        assert_eq!(h.count(), 6);
        assert!((h.sum_seconds() - 120.001001).abs() < 1e-9);
    }

    #[test]
    fn exchanges_are_counted_by_name_with_the_rest_under_other() {
        let mut m = Metrics::default();
        m.count("orders", Counted::Published, 2);
        m.count("", Counted::FailedAttempt, 1);
        m.count("orders", Counted::DeadLettered, 1);
        for i in 0..20 {
            m.count(&format!("x{i}"), Counted::Published, 1);
        }
        let names: Vec<&str> = m.exchanges().map(|e| e.name()).collect();
        assert_eq!(names.len(), MAX_EXCHANGES);
        assert_eq!(&names[..3], ["orders", "", "x0"]);
        assert_eq!(names[MAX_EXCHANGES - 1], OTHER);
        let orders = m.exchanges().next().unwrap();
        assert_eq!((orders.published, orders.failed_attempts, orders.dead_lettered), (2, 0, 1));
        let other = m.exchanges().last().unwrap();
        assert_eq!(other.published, 20 - (MAX_EXCHANGES as u64 - 3));
        // A long name is cut at a character boundary, and counted as the same exchange again.
        let long = "é".repeat(100);
        let mut m = Metrics::default();
        m.count(&long, Counted::Published, 1);
        m.count(&long, Counted::Published, 1);
        let e = m.exchanges().next().unwrap();
        assert_eq!((e.name().len(), e.published), (128, 2));
    }

    #[test]
    fn the_exposition_groups_families_and_escapes_labels() {
        let sample = |name: &str, kind: &str, labels: &[(&str, &str)], value| Sample {
            name: name.into(),
            kind: kind.into(),
            help: "Help \\ text".into(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            value,
        };
        let text = exposition(&[
            sample("outbox_published_total", "counter", &[("exchange", "a\"b\\c\nd")], 3.0),
            sample("outbox_wait_seconds_bucket", "histogram", &[("le", "0.0005")], 1.0),
            sample("outbox_published_total", "counter", &[("exchange", "e")], 0.0),
            sample("outbox_wait_seconds_bucket", "histogram", &[("le", "+Inf")], 2.0),
            sample("outbox_wait_seconds_sum", "histogram", &[], 0.25),
            sample("outbox_wait_seconds_count", "histogram", &[], 2.0),
            sample("outbox_up", "gauge", &[], 1.0),
        ]);
        assert_eq!(
            text,
            "# HELP outbox_published_total Help \\\\ text\n\
             # TYPE outbox_published_total counter\n\
             outbox_published_total{exchange=\"a\\\"b\\\\c\\nd\"} 3\n\
             outbox_published_total{exchange=\"e\"} 0\n\
             # HELP outbox_wait_seconds Help \\\\ text\n\
             # TYPE outbox_wait_seconds histogram\n\
             outbox_wait_seconds_bucket{le=\"0.0005\"} 1\n\
             outbox_wait_seconds_bucket{le=\"+Inf\"} 2\n\
             outbox_wait_seconds_sum 0.25\n\
             outbox_wait_seconds_count 2\n\
             # HELP outbox_up Help \\\\ text\n\
             # TYPE outbox_up gauge\n\
             outbox_up 1\n"
        );
        assert_eq!(format_value(f64::NAN), "NaN");
        assert_eq!(format_value(1.5), "1.5");
    }
}
