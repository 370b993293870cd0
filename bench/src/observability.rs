//! What observability costs. Ambient headers: the transfer of the write benchmark with its
//! event, with `SET LOCAL outbox.headers` (a W3C trace context and a tenant), against the same
//! without headers and with the same headers passed as the event's own. Metrics: reading
//! `outbox.metrics`, `outbox.metrics_text()` and `outbox.stats` with a million events pending,
//! against the same reads of an empty outbox, and the exact count the stats used to make.

use crate::write::pgbench;
use crate::{progress, Row};
use pg_outbox_tests::{unique, unreachable_broker_url, Broker, Cluster};
use std::time::{Duration, Instant};

const ACCOUNTS: i64 = 100_000;
const ROUNDS: usize = 3;
const CLIENTS: u32 = 8;
const HEADERS: &str = r#"{"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "tracestate": "vendor=t61rcWkgMzE", "tenant": "acme"}"#;

fn transfer(before_event: &str, headers_arg: &str, exchange: &str) -> String {
    format!(
        "\\set a random(1, 100000)\n\\set b random(1, 100000)\nBEGIN;\n{before_event}\
         UPDATE accounts SET balance = balance - 100 WHERE id = :a;\n\
         UPDATE accounts SET balance = balance + 100 WHERE id = :b;\n\
         CALL outbox.process_transaction('FundsTransferEvent', jsonb_build_object('amount', 100, 'from', :a::int, 'to', :b::int, 'currency', 'EUR'), \
         aggregate_type => 'account', aggregate_id => :a::text{headers_arg}, exchange => '{exchange}');\nEND;\n"
    )
}

/// Median of each round's ratio to the first variant's run of the same round.
fn median_ratio(runs: &[Vec<f64>], variant: usize) -> f64 {
    let mut r: Vec<f64> = runs.iter().map(|round| round[variant] / round[0]).collect();
    r.sort_by(|a, b| a.partial_cmp(b).unwrap());
    r[r.len() / 2]
}

pub fn ambient_headers(seconds: u32) -> Vec<Row> {
    let cluster = Cluster::start(&crate::settings(&[("max_connections", "60")]));
    cluster.wait_for_worker();
    let mut db = cluster.client();
    db.batch_execute(&format!(
        "CREATE TABLE accounts (id int PRIMARY KEY, balance numeric NOT NULL);
         INSERT INTO accounts SELECT g, 1000000 FROM generate_series(1, {ACCOUNTS}) g;"
    ))
    .unwrap();
    let broker = Broker::connect();
    let exchange = unique("bench.headers");
    broker.exchange(&exchange);
    // The same headers set once per session, through PGOPTIONS (no spaces: it splits on them).
    let session = format!("-c outbox.headers={}", HEADERS.replace(' ', ""));
    let variants = [
        ("none", transfer("", "", &exchange), String::new()),
        (
            "ambient",
            transfer(&format!("SET LOCAL outbox.headers = '{HEADERS}';\n"), "", &exchange),
            String::new(),
        ),
        ("own", transfer("", &format!(", headers => '{HEADERS}'"), &exchange), String::new()),
        ("session", transfer("", "", &exchange), session),
    ];
    // The relay is paused (as in the write benchmark): what is measured is the writer's cost.
    // Twice: with synchronous commits (the disk's flush sets the pace, as usually) and without
    // (the CPU does, so each variant's own work shows).
    cluster.cut_off_broker();
    let mut rows = Vec::new();
    for (mode, commit) in
        [("synchronous commit", ""), ("synchronous_commit off", "-c synchronous_commit=off")]
    {
        let mut runs = Vec::new();
        for round in 1..=ROUNDS {
            let mut tps = Vec::new();
            for (name, script, options) in &variants {
                for sql in ["TRUNCATE outbox.messages", "VACUUM ANALYZE accounts", "CHECKPOINT"] {
                    db.batch_execute(sql).unwrap();
                }
                let t = pgbench(&cluster, name, script, CLIENTS, seconds, &format!("{commit} {options}"));
                progress(&format!(
                    "headers, {mode}, round {round}, {name}: {t:.0} tps ({CLIENTS} clients, {seconds} s)"
                ));
                tps.push(t);
            }
            runs.push(tps);
        }
        let mean = |i: usize| runs.iter().map(|r| r[i]).sum::<f64>() / runs.len() as f64;
        for (i, what) in [
            (1, "SET LOCAL outbox.headers (trace context, 3 headers) in each transaction"),
            (3, "the same headers set once per session (outbox.headers in PGOPTIONS)"),
            (2, "the same headers as the event's own argument"),
        ] {
            rows.push(Row {
                figure: format!("write ({mode}): transfer + event with {what} vs no headers"),
                value: format!("{:.0} tps", mean(i)),
                baseline: format!("{:.0} tps", mean(0)),
                ratio: Some(median_ratio(&runs, i)),
                target: "".into(),
                met: None,
            });
        }
    }
    broker.delete_exchange(&exchange);
    rows
}

/// Mean time of one execution of `sql`, over `n` executions after one warm-up.
fn time_query(db: &mut postgres::Client, sql: &str, n: u32) -> Duration {
    db.batch_execute(sql).unwrap();
    let started = Instant::now();
    for _ in 0..n {
        db.batch_execute(sql).unwrap();
    }
    started.elapsed() / n
}

pub fn metrics_reads(pending: i64) -> Vec<Row> {
    let cluster = Cluster::start(&crate::settings(&[("outbox.amqp_url", &unreachable_broker_url())]));
    let mut db = cluster.client();
    let queries = [
        ("SELECT * FROM outbox.metrics", "outbox.metrics"),
        ("SELECT outbox.metrics_text()", "outbox.metrics_text()"),
        ("SELECT * FROM outbox.stats", "outbox.stats"),
        ("SELECT * FROM outbox.exact_counts()", "outbox.exact_counts()"),
    ];
    let measure = |db: &mut postgres::Client, label: &str| -> Vec<Duration> {
        queries
            .iter()
            .map(|(sql, name)| {
                let n = if name.starts_with("outbox.exact") && label != "empty" { 5 } else { 200 };
                let t = time_query(db, sql, n);
                progress(&format!("metrics, {label}: {name} {:.3} ms", t.as_secs_f64() * 1e3));
                t
            })
            .collect()
    };
    let empty = measure(&mut db, "empty");
    progress(&format!("writing {pending} events (the broker is unreachable: they stay)"));
    db.batch_execute(&format!(
        "SELECT outbox.publish('Pending', jsonb_build_object('n', n)) FROM generate_series(1, {pending}) n"
    ))
    .unwrap();
    db.batch_execute("VACUUM ANALYZE outbox.messages").unwrap();
    let full = measure(&mut db, &format!("{pending} pending"));
    let ms = |d: Duration| format!("{:.3} ms", d.as_secs_f64() * 1e3);
    let mut rows: Vec<Row> = queries[..3]
        .iter()
        .enumerate()
        .map(|(i, (_, name))| Row {
            figure: format!("read {name} with {pending} events pending vs an empty outbox"),
            value: ms(full[i]),
            baseline: ms(empty[i]),
            ratio: Some(full[i].as_secs_f64() / empty[i].as_secs_f64()),
            target: "≤ 200% (a scan: the last row)".into(),
            met: Some(full[i].as_secs_f64() <= 2.0 * empty[i].as_secs_f64()),
        })
        .collect();
    rows.push(Row {
        figure: format!(
            "read outbox.metrics vs the exact count (what outbox.stats cost before 0.3.0), {pending} pending"
        ),
        value: ms(full[0]),
        baseline: ms(full[3]),
        ratio: Some(full[0].as_secs_f64() / full[3].as_secs_f64()),
        target: "".into(),
        met: None,
    });
    rows
}
