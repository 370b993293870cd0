//! pg_outbox benchmark. Every figure is printed beside a baseline measured in the same run on
//! the same machine and broker. Run with `script/bench` (release build, its own cluster, the
//! running RabbitMQ). `script/bench --quick` runs smaller sizes.

mod raw;
mod relay;

use std::fmt::Write as _;

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
    let mut rows = Vec::new();
    rows.extend(relay::throughput(&sizes));
    println!("\n{}", table(&rows));
}
