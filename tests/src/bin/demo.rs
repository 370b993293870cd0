//! The README's demo: a cluster with pg_outbox preloaded, a queue bound to the outbox
//! exchange, one funds transfer committed with its event, and the message as it arrives.
//! Run it with `script/demo`. `--keep` leaves the cluster running for you to explore.

use pg_outbox_tests::{Broker, Cluster};
use std::time::{Duration, Instant};

const TRANSFER: &str = "\
BEGIN;
UPDATE accounts SET balance = balance - 100 WHERE id = '123';
UPDATE accounts SET balance = balance + 100 WHERE id = '456';
CALL outbox.process_transaction('FundsTransferEvent', '{\"amount\": 100, \"from\": \"123\", \"to\": \"456\"}',
                                aggregate_type => 'account', aggregate_id => '123');
COMMIT;";

fn main() {
    let keep = std::env::args().any(|a| a == "--keep");
    if keep {
        std::env::set_var("OUTBOX_KEEP_CLUSTERS", "1");
    }
    println!("==> starting a PostgreSQL 15 cluster with shared_preload_libraries = 'pg_outbox'");
    let cluster = Cluster::start(&[]);
    println!("    port {}, data in {}", cluster.port, cluster.data().display());
    println!("    CREATE DATABASE app; CREATE EXTENSION pg_outbox;  (outbox.database = 'app')");
    cluster.wait_for_worker();

    let broker = Broker::connect();
    let mut db = cluster.client();
    let wait_connected = Instant::now();
    while !db
        .query_one("SELECT coalesce(broker_connected, false) FROM outbox.stats", &[])
        .unwrap()
        .get::<_, bool>(0)
    {
        assert!(wait_connected.elapsed() < Duration::from_secs(60), "the worker did not reach RabbitMQ");
        std::thread::sleep(Duration::from_millis(100));
    }
    let consumer = broker.consume("outbox", "FundsTransferEvent");
    println!("==> queue {} bound to exchange 'outbox' with key 'FundsTransferEvent'", consumer.queue);

    db.batch_execute(
        "CREATE TABLE accounts (id text PRIMARY KEY, balance numeric NOT NULL);
         INSERT INTO accounts VALUES ('123', 1000), ('456', 0);",
    )
    .unwrap();
    println!("==> the application's transaction:\n{TRANSFER}");
    let committed = Instant::now();
    db.batch_execute(TRANSFER).unwrap();

    let message = consumer.wait_for(1, Duration::from_secs(30)).remove(0);
    let latency = message.received_at.saturating_duration_since(committed);
    println!("==> received from RabbitMQ {latency:.1?} after COMMIT returned:");
    println!("    exchange      {}", message.exchange);
    println!("    routing key   {}", message.routing_key);
    println!("    message_id    {}", message.message_id.as_deref().unwrap_or("-"));
    println!("    type          {}", message.message_type.as_deref().unwrap_or("-"));
    println!("    content_type  {}", message.content_type.as_deref().unwrap_or("-"));
    println!("    delivery_mode {} (persistent)", message.delivery_mode.unwrap_or(0));
    println!("    timestamp     {}", message.timestamp.unwrap_or(0));
    for (k, v) in &message.headers {
        println!("    header        {k} = {v}");
    }
    println!("    body          {}", String::from_utf8_lossy(&message.body));

    cluster.wait_drained(Duration::from_secs(30));
    let stats = db
        .query_one("SELECT pending, published_total, worker_state, broker_connected FROM outbox.stats", &[])
        .unwrap();
    println!(
        "==> outbox.stats: pending {}, published_total {}, worker_state {}, broker_connected {}",
        stats.get::<_, i64>(0),
        stats.get::<_, i64>(1),
        stats.get::<_, String>(2),
        stats.get::<_, bool>(3)
    );
    broker.delete_queue(&consumer.queue);
    if keep {
        println!(
            "==> cluster left running: psql -h 127.0.0.1 -p {} -U postgres app   (stop: pg_ctl -D {} stop)",
            cluster.port,
            cluster.data().display()
        );
        std::mem::forget(cluster);
    }
}
