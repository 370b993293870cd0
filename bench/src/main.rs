//! pg_outbox benchmark. Every figure is printed beside a baseline measured in the same run on
//! the same machine and broker. Run with `script/bench` (release build, its own cluster, the
//! running RabbitMQ). `script/bench --quick` runs smaller sizes.

mod burst;
mod capture;
mod cpu;
mod inbox;
mod latency;
mod naive;
mod observability;
mod publishers;
mod raw;
mod relay;
mod stream;
mod tls;
mod write;

use std::fmt::Write as _;

/// Server settings of every benchmark cluster: a production-like buffer cache (the test
/// clusters' 64 MB would make a million-event backlog a cache-miss benchmark).
pub const SERVER: &[(&str, &str)] = &[("shared_buffers", "'1GB'"), ("max_wal_size", "'4GB'")];

/// [`SERVER`] plus `extra`.
pub fn settings<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    SERVER.iter().copied().chain(extra.iter().copied()).collect()
}

/// A result line: figure, value, baseline, ratio (value / baseline), target.
pub struct Row {
    pub figure: String,
    pub value: String,
    pub baseline: String,
    pub ratio: Option<f64>,
    pub target: String,
    pub met: Option<bool>,
}

pub fn progress(text: &str) {
    eprintln!("[bench] {text}");
}

fn table(rows: &[Row]) -> String {
    let mut out = String::new();
    writeln!(out, "| figure | pg_outbox | baseline | ratio | target | met |").unwrap();
    writeln!(out, "| --- | ---: | ---: | ---: | --- | --- |").unwrap();
    for r in rows {
        writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} |",
            r.figure,
            r.value,
            r.baseline,
            r.ratio.map(|x| format!("{:.0}%", x * 100.0)).unwrap_or_default(),
            r.target,
            match r.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "",
            }
        )
        .unwrap();
    }
    out
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let sizes = if quick { relay::Sizes::quick() } else { relay::Sizes::full() };
    // `--only relay,burst,floor,latency,write,naive,tls,capture,headers,metrics,publishers,inbox,stream` runs some
    // parts.
    let only: Option<String> = std::env::args().skip_while(|a| a != "--only").nth(1);
    let run = |part: &str| only.as_deref().is_none_or(|o| o.split(',').any(|p| p == part));
    let (seconds, write_seconds) = if quick { (5, 5) } else { (20, 20) };
    let started = std::time::Instant::now();
    let mut rows = Vec::new();
    let mut relay_rate = None;
    if run("relay") {
        let (relay_rows, rate) = relay::throughput(&sizes);
        rows.extend(relay_rows);
        relay_rate = Some(rate);
    }
    if run("burst") {
        let idle = std::time::Duration::from_secs(if quick { 10 } else { 60 });
        rows.extend(burst::after_idle_and_flow(&sizes, idle, relay_rate));
    }
    if run("floor") {
        rows.extend(burst::past_waiting_stream_events(&sizes));
    }
    if run("latency") {
        rows.extend(latency::latency(seconds));
    }
    if run("write") {
        rows.extend(write::write_overhead(write_seconds));
    }
    if run("naive") {
        rows.extend(naive::naive(relay_rate, if quick { 5 } else { 15 }));
    }
    if run("tls") {
        rows.extend(tls::tls(if quick { 20_000 } else { 100_000 }));
    }
    if run("capture") {
        rows.extend(capture::capture(if quick { 20_000 } else { 100_000 }));
    }
    if run("headers") {
        rows.extend(observability::ambient_headers(if quick { 5 } else { 10 }));
    }
    if run("metrics") {
        rows.extend(observability::metrics_reads(if quick { 100_000 } else { 1_000_000 }));
    }
    if run("publishers") {
        rows.extend(publishers::publishers(if quick { 50_000 } else { 200_000 }));
    }
    if run("inbox") {
        rows.extend(inbox::inbox(if quick { 3 } else { 6 }));
    }
    if run("stream") {
        rows.extend(stream::stream(&if quick { stream::Sizes::quick() } else { stream::Sizes::full() }));
    }
    progress(&format!("done in {:.0?}", started.elapsed()));
    println!("\n{}", table(&rows));
}
