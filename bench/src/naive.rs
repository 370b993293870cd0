//! The naive baseline: the application-level poller most teams write first. It locks the
//! oldest row, publishes it, waits for the confirm, deletes it and commits, one event at a
//! time. Measured against the same broker and the same kind of events.

use crate::{progress, Row};
use amqprs::channel::{BasicPublishArguments, ConfirmSelectArguments};
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::BasicProperties;
use pg_outbox_tests::{unique, Broker, Cluster};
use std::time::{Duration, Instant};

/// Events per second of the naive poller over `seconds`.
pub fn naive_rate(cluster: &Cluster, exchange: &str, seconds: u64) -> (f64, u64) {
    let mut db = cluster.client();
    db.batch_execute(
        "CREATE TABLE naive_outbox (id bigserial PRIMARY KEY, event_type text NOT NULL, payload jsonb NOT NULL);
         INSERT INTO naive_outbox (event_type, payload)
         SELECT 'FundsTransferEvent', jsonb_build_object('amount', 100, 'ref', g) FROM generate_series(1, 100000) g;",
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (connection, channel) = rt.block_on(async {
        let connection = Connection::open(&OpenConnectionArguments::new("127.0.0.1", 5672, "guest", "guest"))
            .await
            .unwrap();
        let channel = connection.open_channel(None).await.unwrap();
        channel.confirm_select(ConfirmSelectArguments::new(false)).await.unwrap();
        (connection, channel)
    });
    let (tx, mut confirmed) = tokio::sync::watch::channel(0u64);
    rt.block_on(channel.register_callback(crate::raw::ConfirmCounter::new(tx))).unwrap();
    let started = Instant::now();
    let mut published = 0u64;
    while started.elapsed() < Duration::from_secs(seconds) {
        let mut t = db.transaction().unwrap();
        let row = t
            .query_opt(
                "SELECT id, payload::text FROM naive_outbox ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED",
                &[],
            )
            .unwrap();
        let Some(row) = row else { break };
        let (id, payload): (i64, String) = (row.get(0), row.get(1));
        rt.block_on(async {
            let mut props = BasicProperties::default();
            props.with_message_id(&id.to_string()).with_delivery_mode(2);
            channel
                .basic_publish(
                    props.finish(),
                    payload.into_bytes(),
                    BasicPublishArguments::new(exchange, "FundsTransferEvent"),
                )
                .await
                .unwrap();
            while *confirmed.borrow() < published + 1 {
                confirmed.changed().await.unwrap();
            }
        });
        t.execute("DELETE FROM naive_outbox WHERE id = $1", &[&id]).unwrap();
        t.commit().unwrap();
        published += 1;
    }
    let rate = published as f64 / started.elapsed().as_secs_f64();
    rt.block_on(async {
        channel.close().await.ok();
        connection.close().await.ok();
    });
    (rate, published)
}

pub fn naive(relay_rate: Option<f64>, seconds: u64) -> Vec<Row> {
    let cluster = Cluster::start(&crate::settings(&[]));
    let broker = Broker::connect();
    let exchange = unique("bench.naive");
    broker.exchange(&exchange);
    let queue = broker.queue(&exchange, "#");
    progress(&format!("naive poller (one transaction per message, waits for each confirm) for {seconds} s"));
    let (rate, n) = naive_rate(&cluster, &exchange, seconds);
    progress(&format!("  {rate:.0} events/s ({n} events)"));
    broker.delete_queue(&queue);
    broker.delete_exchange(&exchange);
    vec![Row {
        figure: "relay vs the naive poller (commit per message, confirm per message)".into(),
        value: relay_rate.map(|r| format!("{r:.0} events/s")).unwrap_or_else(|| "(relay not run)".into()),
        baseline: format!("{rate:.0} events/s naive poller"),
        ratio: relay_rate.map(|r| r / rate),
        target: "reported".into(),
        met: None,
    }]
}
