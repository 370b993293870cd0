//! What the broker will not take: a message too large for one frame, a connection it drops
//! at every publish. One bad message fails alone, and the worker never reconnects faster
//! than its back-off, however the connection ended.

use pg_outbox_tests::*;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const WITHIN: Duration = Duration::from_secs(90);

#[test]
fn a_row_too_large_for_one_frame_is_dead_lettered_alone_without_reconnecting() {
    let _alone = exclusive();
    let proxy = Proxy::start(5672);
    let url = proxy.url();
    let cluster = Cluster::start(&[&quick_retries("2")[..], &[("outbox.amqp_url", url.as_str())]].concat());
    let broker = Broker::connect();
    let exchange = broker.own_exchange();
    let consumer = broker.consume(&exchange, "#");
    let mut db = cluster.client();
    wait_until(WITHIN, "the worker to connect", || cluster.broker_connected().then_some(()));
    let connections = proxy.accepted.load(Ordering::SeqCst);

    // outbox.publish refuses it, knowing the broker's frame_max.
    let big_id = "i".repeat(140_000);
    let err = db
        .query_one(
            "SELECT outbox.publish('Big', '{}', aggregate_id => $1, exchange => $2)",
            &[&big_id, &exchange.name],
        )
        .unwrap_err();
    assert_eq!(err.code(), Some(&postgres::error::SqlState::PROGRAM_LIMIT_EXCEEDED), "{err}");
    let message = err.as_db_error().map(|e| e.message().to_string()).unwrap_or_default();
    assert!(message.contains("frame_max"), "{message}");

    // Written around outbox.publish, between good events of its aggregate and others.
    db.execute(
        "SELECT outbox.publish('Before', '{}', aggregate_id => 'a', exchange => $1)",
        &[&exchange.name],
    )
    .unwrap();
    db.execute(
        "INSERT INTO outbox.messages (message_id, event_type, payload, aggregate_id, headers, exchange)
         VALUES (gen_random_uuid(), 'Huge', '{}', 'a', jsonb_build_object('blob', repeat('h', 200000)), $1)",
        &[&exchange.name],
    )
    .unwrap();
    db.execute(
        "SELECT outbox.publish('Other', jsonb_build_object('n', n), exchange => $1) FROM generate_series(1, 100) n",
        &[&exchange.name],
    )
    .unwrap();
    db.execute(
        "SELECT outbox.publish('After', '{}', aggregate_id => 'a', exchange => $1)",
        &[&exchange.name],
    )
    .unwrap();
    let got = consumer.wait_for(102, WITHIN);
    let dead: String = wait_until(WITHIN, "the huge row dead-lettered", || {
        db.query_opt("SELECT last_error FROM outbox.dead_letters WHERE event_type = 'Huge'", &[])
            .unwrap()
            .map(|r| r.get(0))
    });
    assert!(dead.starts_with("too large") && dead.contains("frame_max"), "{dead}");
    let of_a: Vec<_> = got
        .iter()
        .filter(|d| d.header("aggregate_id") == Some("a"))
        .filter_map(|d| d.message_type.clone())
        .collect();
    assert_eq!(of_a, vec!["Before", "After"]);
    cluster.wait_drained(WITHIN);
    assert_eq!(proxy.accepted.load(Ordering::SeqCst), connections, "no reconnect for one bad message");
}

#[test]
fn a_broker_that_drops_every_publishing_connection_is_not_stormed() {
    let _alone = exclusive();
    let proxy = Proxy::start(5672);
    let cluster = Cluster::start(&[("outbox.amqp_url", &proxy.url())]);
    let broker = Broker::connect();
    let exchange = broker.own_exchange();
    let consumer = broker.consume(&exchange, "#");
    wait_until(WITHIN, "the worker to connect", || cluster.broker_connected().then_some(()));
    // Past the handshake, the first publish (4 kB) goes over the limit: every connection is
    // cut as soon as it publishes.
    proxy.cut_after(Some(3000));
    let before = proxy.accepted.load(Ordering::SeqCst);
    let started = Instant::now();
    cluster
        .client()
        .execute(
            "SELECT outbox.publish('Dropped', jsonb_build_object('pad', repeat('x', 4000), 'n', n), exchange => $1)
               FROM generate_series(1, 20) n",
            &[&exchange.name],
        )
        .unwrap();
    std::thread::sleep(Duration::from_secs(10));
    let connections = proxy.accepted.load(Ordering::SeqCst) - before;
    let elapsed = started.elapsed();
    println!("connections cut at their first publish: {connections} in {elapsed:.1?}");
    // Back-off from 250 ms, doubling: about 6 attempts in 10 s. Reconnecting at once would
    // be hundreds.
    assert!((2..=10).contains(&connections), "{connections} connections in {elapsed:?}");
    let dead: i64 =
        cluster.client().query_one("SELECT count(*) FROM outbox.dead_letters", &[]).unwrap().get(0);
    assert_eq!(dead, 0, "a lost connection is not the messages' fault");
    proxy.cut_after(None);
    consumer.wait_for(20, WITHIN);
    cluster.wait_drained(WITHIN);
}
