//! Write overhead: pgbench running a transfer that updates two accounts and writes its event,
//! against the same transfer inserting the same payload into a plain table, and PgQ's
//! `pgq.insert_event` as a peer (when the pgq extension is installed).

use crate::{progress, Row};
use pg_outbox_tests::cluster::pg_bin;
use pg_outbox_tests::{unique, Broker, Cluster};
use std::process::Command;

const ACCOUNTS: i64 = 100_000;
/// Rounds of alternating runs; the ratio reported is the median of each round's ratio.
const ROUNDS: usize = 3;

const HEAD: &str = "\\set a random(1, 100000)\n\\set b random(1, 100000)\nBEGIN;\n\
UPDATE accounts SET balance = balance - 100 WHERE id = :a;\n\
UPDATE accounts SET balance = balance + 100 WHERE id = :b;\n";

fn script(event: &str) -> String {
    format!("{HEAD}{event}\nEND;\n")
}

/// The same payload expression in every variant (pgbench's prepared mode passes :a and :b as
/// parameters, so they must stay outside string literals).
fn payload() -> &'static str {
    "jsonb_build_object('amount', 100, 'from', :a::int, 'to', :b::int, 'currency', 'EUR')"
}

/// Runs pgbench with `script` and returns transactions per second. `options` go to the
/// sessions (PGOPTIONS).
pub(crate) fn pgbench(
    cluster: &Cluster,
    name: &str,
    script: &str,
    clients: u32,
    seconds: u32,
    options: &str,
) -> f64 {
    let path = cluster.dir.join(format!("{name}.sql"));
    std::fs::write(&path, script).unwrap();
    let out = Command::new(pg_bin().join("pgbench"))
        .env("PGOPTIONS", options)
        .args(["-h", "127.0.0.1", "-p", &cluster.port.to_string(), "-U", "postgres", "-n", "-M", "prepared"])
        .args(["-c", &clients.to_string(), "-j", "2", "-T", &seconds.to_string(), "--max-tries", "10"])
        .arg("-f")
        .arg(&path)
        .arg("app")
        .output()
        .expect("run pgbench");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "pgbench failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    text.lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|v| v.parse().ok())
        .expect("pgbench prints tps")
}

pub fn write_overhead(seconds: u32) -> Vec<Row> {
    let cluster = Cluster::start(&crate::settings(&[("max_connections", "60")]));
    cluster.wait_for_worker();
    let mut db = cluster.client();
    db.batch_execute(&format!(
        "CREATE TABLE accounts (id int PRIMARY KEY, balance numeric NOT NULL);
         INSERT INTO accounts SELECT g, 1000000 FROM generate_series(1, {ACCOUNTS}) g;
         CREATE TABLE plain_events (id bigserial PRIMARY KEY, payload jsonb NOT NULL);"
    ))
    .unwrap();
    db.batch_execute("VACUUM ANALYZE accounts").unwrap();
    let pgq = db.batch_execute("CREATE EXTENSION pgq; SELECT pgq.create_queue('bench');").is_ok();
    let broker = Broker::connect();
    let exchange = unique("bench.write");
    broker.exchange(&exchange);
    let queue = broker.queue(&exchange, "#");

    let outbox = script(&format!(
        "CALL outbox.process_transaction('FundsTransferEvent', {}, aggregate_type => 'account', aggregate_id => :a::text, exchange => '{exchange}');",
        payload()
    ));
    let plain = script(&format!("INSERT INTO plain_events (payload) VALUES ({});", payload()));
    let pgq_script =
        script(&format!("SELECT pgq.insert_event('bench', 'FundsTransferEvent', ({})::text);", payload()));
    let clients = 8;
    // Every run starts from the same state (a vacuumed accounts table, empty event tables),
    // and the variants alternate over two rounds, so that no variant gains from its place.
    let reset = |db: &mut postgres::Client| {
        db.batch_execute("TRUNCATE plain_events, outbox.messages").unwrap();
        if pgq {
            let _ = db.batch_execute("SELECT pgq.drop_queue('bench'); SELECT pgq.create_queue('bench');");
        }
        db.batch_execute("VACUUM ANALYZE accounts").unwrap();
        db.batch_execute("CHECKPOINT").unwrap();
    };
    // Two commit modes: as applications usually run (each commit waits for its WAL flush, so
    // the disk's fsync sets the pace), and with synchronous_commit off (the CPU sets it).
    let mut runs: std::collections::HashMap<(&str, bool), Vec<f64>> = Default::default();
    cluster.cut_off_broker();
    for (sync, rounds) in [(true, ROUNDS), (false, 2)] {
        let options = if sync { "" } else { "-c synchronous_commit=off" };
        for round in 1..=rounds {
            for (name, text) in [("plain", &plain), ("outbox", &outbox), ("pgq", &pgq_script)] {
                if name == "pgq" && !pgq {
                    continue;
                }
                reset(&mut db);
                let tps = pgbench(&cluster, name, text, clients, seconds, options);
                progress(&format!(
                    "synchronous_commit {}, round {round}, {name}: {tps:.0} tps ({clients} clients, {seconds} s)",
                    if sync { "on" } else { "off" }
                ));
                runs.entry((name, sync)).or_default().push(tps);
            }
        }
    }
    cluster.reconnect_broker();
    reset(&mut db);
    progress("outbox.process_transaction with the relay publishing meanwhile");
    let relaying_tps = pgbench(&cluster, "outbox", &outbox, clients, seconds, "");
    progress(&format!("  {relaying_tps:.0} tps"));
    let mean =
        |name: &str, sync: bool| runs.get(&(name, sync)).map(|v| v.iter().sum::<f64>() / v.len() as f64);
    // Each round's ratio to the plain run of the same round, then the median: drift over the
    // run (the machine is shared with the broker) cancels out.
    let median_ratio = |name: &str, sync: bool| {
        runs.get(&(name, sync)).map(|v| {
            let mut r: Vec<f64> = v.iter().zip(&runs[&("plain", sync)]).map(|(x, p)| x / p).collect();
            r.sort_by(|a, b| a.partial_cmp(b).unwrap());
            r[r.len() / 2]
        })
    };
    let plain_tps = mean("plain", true).unwrap();
    let outbox_tps = mean("outbox", true).unwrap();
    let outbox_ratio = median_ratio("outbox", true).unwrap();
    let pgq_tps = mean("pgq", true);
    let pgq_ratio = median_ratio("pgq", true);
    let cpu_plain = mean("plain", false).unwrap();
    let cpu_outbox = mean("outbox", false).unwrap();
    let cpu_ratio = median_ratio("outbox", false).unwrap();
    let cpu_pgq = mean("pgq", false);
    if !pgq {
        progress("pgq is not installed (Debian package postgresql-15-pgq3): skipped");
    }
    broker.delete_queue(&queue);
    broker.delete_exchange(&exchange);

    let mut rows = vec![
        Row {
            figure: "write: transfer + outbox.process_transaction (relay paused, synchronous commit)".into(),
            value: format!("{outbox_tps:.0} tps"),
            baseline: format!("{plain_tps:.0} tps, same transfer + INSERT into a plain table"),
            ratio: Some(outbox_ratio),
            target: "≥ 90% of plain".into(),
            met: Some(outbox_ratio >= 0.9),
        },
        Row {
            figure: "write: the same with synchronous_commit off (CPU-bound)".into(),
            value: format!("{cpu_outbox:.0} tps"),
            baseline: format!(
                "{cpu_plain:.0} tps plain{}",
                cpu_pgq.map(|t| format!(", PgQ {t:.0} tps")).unwrap_or_default()
            ),
            ratio: Some(cpu_ratio),
            target: "reported".into(),
            met: None,
        },
        Row {
            figure: "write: the same while the relay publishes to RabbitMQ on the same 2 cores".into(),
            value: format!("{relaying_tps:.0} tps"),
            baseline: format!("{plain_tps:.0} tps plain"),
            ratio: Some(relaying_tps / plain_tps),
            target: "reported".into(),
            met: None,
        },
    ];
    if let Some(tps) = pgq_tps {
        rows.push(Row {
            figure: "write: transfer + pgq.insert_event (PgQ, peer, synchronous commit)".into(),
            value: format!("{tps:.0} tps"),
            baseline: format!("{plain_tps:.0} tps plain"),
            ratio: pgq_ratio,
            target: "peer".into(),
            met: None,
        });
    }
    rows
}
