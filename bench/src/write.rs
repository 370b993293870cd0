//! Write overhead: pgbench running a transfer that updates two accounts and writes its event,
//! against the same transfer inserting the same payload into a plain table, and PgQ's
//! `pgq.insert_event` as a peer (when the pgq extension is installed).

use crate::relay::{disconnect, BROKER_URL};
use crate::{progress, Row};
use pg_outbox_tests::cluster::PG_BIN;
use pg_outbox_tests::{unique, Broker, Cluster};
use std::process::Command;

const ACCOUNTS: i64 = 100_000;

const HEAD: &str = "\\set a random(1, 100000)\n\\set b random(1, 100000)\nBEGIN;\n\
UPDATE accounts SET balance = balance - 100 WHERE id = :a;\n\
UPDATE accounts SET balance = balance + 100 WHERE id = :b;\n";

fn script(event: &str) -> String {
    format!("{HEAD}{event}\nEND;\n")
}

/// The same payload expression in every variant (pgbench's prepared mode passes :a and :b as
/// parameters, so they must stay outside string literals).
fn payload() -> &'static str {
    "jsonb_build_object('amount', 100, 'from', :a, 'to', :b, 'currency', 'EUR')"
}

/// Runs pgbench with `script` and returns transactions per second.
fn pgbench(cluster: &Cluster, name: &str, script: &str, clients: u32, seconds: u32) -> f64 {
    let path = cluster.dir.join(format!("{name}.sql"));
    std::fs::write(&path, script).unwrap();
    let out = Command::new(format!("{PG_BIN}/pgbench"))
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
    let cluster = Cluster::start(&[("outbox.amqp_url", BROKER_URL), ("max_connections", "60")]);
    cluster.wait_for_worker();
    let mut db = cluster.client();
    db.batch_execute(&format!(
        "CREATE TABLE accounts (id int PRIMARY KEY, balance numeric NOT NULL);
         INSERT INTO accounts SELECT g, 1000000 FROM generate_series(1, {ACCOUNTS}) g;
         CREATE TABLE plain_events (id bigserial PRIMARY KEY, payload jsonb NOT NULL);
         VACUUM ANALYZE accounts;"
    ))
    .unwrap();
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

    progress(&format!("pgbench {seconds} s, {clients} clients: plain table"));
    let plain_tps = pgbench(&cluster, "plain", &plain, clients, seconds);
    progress(&format!("  {plain_tps:.0} tps"));
    progress("pgbench: outbox.process_transaction, relay publishing meanwhile");
    let relaying_tps = pgbench(&cluster, "outbox", &outbox, clients, seconds);
    progress(&format!("  {relaying_tps:.0} tps"));
    disconnect(&cluster);
    progress("pgbench: outbox.process_transaction, relay paused (the write path alone)");
    let outbox_tps = pgbench(&cluster, "outbox", &outbox, clients, seconds);
    progress(&format!("  {outbox_tps:.0} tps"));
    let pgq_tps = if pgq {
        progress("pgbench: pgq.insert_event");
        let tps = pgbench(&cluster, "pgq", &pgq_script, clients, seconds);
        progress(&format!("  {tps:.0} tps"));
        Some(tps)
    } else {
        progress("pgq is not installed (Debian package postgresql-15-pgq3): skipped");
        None
    };
    cluster.reconfigure(&[("outbox.amqp_url", BROKER_URL)]);
    broker.delete_queue(&queue);
    broker.delete_exchange(&exchange);

    let mut rows = vec![
        Row {
            figure: "write: transfer + outbox.process_transaction (relay paused)".into(),
            value: format!("{outbox_tps:.0} tps"),
            baseline: format!("{plain_tps:.0} tps, same transfer + INSERT into a plain table"),
            ratio: Some(outbox_tps / plain_tps),
            target: "≥ 90% of plain".into(),
            met: Some(outbox_tps >= 0.9 * plain_tps),
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
            figure: "write: transfer + pgq.insert_event (PgQ, peer)".into(),
            value: format!("{tps:.0} tps"),
            baseline: format!("{plain_tps:.0} tps plain"),
            ratio: Some(tps / plain_tps),
            target: "peer".into(),
            met: None,
        });
    }
    rows
}
