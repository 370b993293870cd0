//! The publisher against the real RabbitMQ: confirms, nacks, returns, refusals, timeouts and
//! per-aggregate order, each outcome checked against what a consumer received.

use amqprs::{FieldTable, FieldValue};
use pg_outbox_core::outcome::{FailureKind, Handed, Outcome};
use pg_outbox_core::publisher::{Publisher, PublisherConfig};
use pg_outbox_core::validate::ExchangeFilter;
use pg_outbox_core::{BrokerUrl, OutboxMessage};
use pg_outbox_tests::{unique, Broker, Proxy};
use std::time::Duration;
use tokio::runtime::Runtime;

const WITHIN: Duration = Duration::from_secs(30);

fn config(exchange: &str) -> PublisherConfig {
    PublisherConfig {
        url: BrokerUrl::parse("amqp://guest:guest@127.0.0.1:5672/%2F").unwrap(),
        tls: Default::default(),
        default_exchange: exchange.to_string(),
        declare_default_exchange: false,
        mandatory: true,
        confirm_timeout: Duration::from_secs(10),
        max_in_flight: 100,
        allowed_exchanges: ExchangeFilter::All,
        connection_name: "pg_outbox publisher test".into(),
    }
}

fn message(row_id: i64, aggregate: Option<&str>, routing_key: &str) -> OutboxMessage {
    OutboxMessage {
        row_id,
        message_id: format!("m-{row_id}"),
        event_type: "Tested".into(),
        body: format!("{{\"row\": {row_id}}}").into_bytes(),
        aggregate_type: aggregate.map(|_| "thing".into()),
        aggregate_id: aggregate.map(str::to_string),
        headers: None,
        routing_key: Some(routing_key.into()),
        exchange: None,
        created_at_unix: 1_700_000_000,
        attempts: 0,
    }
}

/// A runtime and a publisher whose default exchange is `exchange`.
fn publisher_for(exchange: &str) -> (Runtime, Publisher) {
    publisher_with(config(exchange))
}

fn publisher_with(config: PublisherConfig) -> (Runtime, Publisher) {
    let rt = Runtime::new().unwrap();
    let publisher = rt.block_on(Publisher::connect(config)).unwrap();
    (rt, publisher)
}

fn failed(o: &Outcome) -> Option<FailureKind> {
    match o {
        Outcome::Failed { kind, .. } => Some(*kind),
        _ => None,
    }
}

#[test]
fn a_confirmed_batch_arrives_in_order_per_aggregate() {
    let broker = Broker::connect();
    let exchange = broker.own_exchange();
    let consumer = broker.consume(&exchange, "#");
    let (rt, mut publisher) = publisher_for(&exchange);
    let aggregates = ["a", "b", "c"];
    let batch: Vec<OutboxMessage> =
        (1..=300).map(|i| message(i, (i % 4 != 0).then(|| aggregates[i as usize % 3]), "k")).collect();
    let report = rt.block_on(publisher.publish_batch(batch));
    assert!(report.connection_lost.is_none());
    assert_eq!(report.confirmed(), 300, "{:?}", report.outcomes);
    let got = consumer.wait_for(300, WITHIN);
    for agg in aggregates {
        let rows: Vec<i64> = got
            .iter()
            .filter(|d| d.header("aggregate_id") == Some(agg))
            .map(|d| d.json()["row"].as_i64().unwrap())
            .collect();
        assert!(rows.windows(2).all(|w| w[0] < w[1]), "{agg}: {rows:?}");
        assert!(rows.len() >= 70);
    }
    consumer.expect_no_more(300, Duration::from_millis(300));
}

#[test]
fn unroutable_messages_fail_only_with_mandatory() {
    let broker = Broker::connect();
    let exchange = broker.own_exchange();
    let consumer = broker.consume(&exchange, "routed");
    let (rt, mut publisher) = publisher_for(&exchange);
    let batch = vec![message(1, None, "routed"), message(2, None, "nowhere"), message(3, None, "routed")];
    let report = rt.block_on(publisher.publish_batch(batch.clone()));
    assert_eq!(report.outcomes[0], Outcome::Confirmed);
    assert_eq!(failed(&report.outcomes[1]), Some(FailureKind::Unroutable));
    assert_eq!(report.outcomes[2], Outcome::Confirmed);
    consumer.wait_for(2, WITHIN);

    let mut lax =
        rt.block_on(Publisher::connect(PublisherConfig { mandatory: false, ..config(&exchange) })).unwrap();
    let report = rt.block_on(lax.publish_batch(batch));
    assert_eq!(report.confirmed(), 3, "without mandatory the broker drops it and confirms");
}

#[test]
fn a_missing_exchange_fails_its_messages_and_the_next_batch_goes_through() {
    let broker = Broker::connect();
    let exchange = broker.own_exchange();
    let consumer = broker.consume(&exchange, "#");
    let (rt, mut publisher) = publisher_for(&exchange);
    let mut bad = message(2, Some("x"), "k");
    bad.exchange = Some(unique("missing"));
    let batch = vec![message(1, None, "k"), bad, message(3, Some("x"), "k")];
    let report = rt.block_on(publisher.publish_batch(batch));
    assert!(report.connection_lost.is_none(), "a channel error is not a connection loss");
    assert_eq!(failed(&report.outcomes[1]), Some(FailureKind::Refused), "{:?}", report.outcomes);
    assert_eq!(report.outcomes[2], Outcome::NotAttempted, "held back behind its aggregate's failure");
    assert_ne!(failed(&report.outcomes[0]), Some(FailureKind::Refused), "the broker named the culprit");

    // A fresh channel is opened for the next batch.
    let report = rt.block_on(publisher.publish_batch(vec![message(3, Some("x"), "k")]));
    assert_eq!(report.outcomes, vec![Outcome::Confirmed]);
    let got = consumer.wait_for(2, WITHIN);
    assert!(got.iter().any(|d| d.message_id.as_deref() == Some("m-3")));
}

#[test]
fn nacked_messages_fail_and_hold_back_their_aggregate() {
    let broker = Broker::connect();
    let exchange = broker.own_exchange();
    // A queue that takes one message and rejects the rest: the broker nacks them.
    let mut args = FieldTable::new();
    args.insert("x-max-length".try_into().unwrap(), FieldValue::l(1));
    args.insert("x-overflow".try_into().unwrap(), FieldValue::S("reject-publish".try_into().unwrap()));
    let full = broker.consume_with(&exchange, "full", args);
    drop(full); // stop consuming; the queue stays and fills up
    let (rt, mut publisher) = publisher_for(&exchange);
    let batch =
        vec![message(1, Some("a"), "full"), message(2, Some("a"), "full"), message(3, Some("a"), "full")];
    let report = rt.block_on(publisher.publish_batch(batch));
    assert_eq!(report.outcomes[0], Outcome::Confirmed);
    assert_eq!(failed(&report.outcomes[1]), Some(FailureKind::Nacked), "{:?}", report.outcomes);
    assert_eq!(report.outcomes[2], Outcome::NotAttempted);
}

#[test]
fn invalid_rows_fail_without_reaching_the_broker() {
    let broker = Broker::connect();
    let exchange = broker.own_exchange();
    let (rt, mut publisher) = publisher_for(&exchange);
    let mut bad = message(1, Some("a"), "k");
    bad.headers = Some("[\"not an object\"]".into());
    let report = rt.block_on(publisher.publish_batch(vec![bad, message(2, Some("a"), "k")]));
    assert_eq!(failed(&report.outcomes[0]), Some(FailureKind::Invalid));
    assert_eq!(report.outcomes[1], Outcome::NotAttempted);
}

#[test]
fn a_hung_broker_times_out_and_a_cut_connection_is_reported() {
    let broker = Broker::connect();
    let exchange = broker.own_exchange();
    let proxy = Proxy::start(5672);
    let rt = Runtime::new().unwrap();
    let url = BrokerUrl::parse(&format!("amqp://guest:guest@127.0.0.1:{}/%2F", proxy.port)).unwrap();
    let cfg = PublisherConfig { url, confirm_timeout: Duration::from_millis(800), ..config(&exchange) };
    let mut publisher = rt.block_on(Publisher::connect(cfg.clone())).unwrap();

    proxy.stall(true);
    let report = rt.block_on(publisher.publish_batch(vec![message(1, None, "k"), message(2, None, "k")]));
    assert_eq!(failed(&report.outcomes[0]), Some(FailureKind::Timeout), "{:?}", report);
    assert_eq!(failed(&report.outcomes[1]), Some(FailureKind::Timeout));
    proxy.stall(false);

    let mut publisher = rt.block_on(Publisher::connect(cfg)).unwrap();
    proxy.cut();
    let report = rt.block_on(publisher.publish_batch(vec![message(3, None, "k")]));
    assert!(report.connection_lost.as_ref().is_some_and(|l| !l.refused), "{report:?}");
    assert_ne!(report.outcomes[0], Outcome::Confirmed);
    assert!(!publisher.is_connected());
}

#[test]
fn connecting_to_nothing_fails_fast_without_the_password() {
    let rt = Runtime::new().unwrap();
    let port = pg_outbox_tests::cluster::free_port();
    let url = BrokerUrl::parse(&format!("amqp://app:s3cr3t-pw@127.0.0.1:{port}/%2F?connection_timeout=500"))
        .unwrap();
    let err = rt
        .block_on(Publisher::connect(PublisherConfig { url, ..config("x") }))
        .err()
        .expect("no broker there");
    let text = err.to_string();
    assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
    assert!(!text.contains("s3cr3t-pw"), "{text}");
}

fn with_headers(row_id: i64, bytes: usize) -> OutboxMessage {
    let mut m = message(row_id, None, "k");
    m.headers = Some(format!(r#"{{"blob": "{}"}}"#, "h".repeat(bytes)));
    m
}

#[test]
fn headers_larger_than_a_frame_fail_before_reaching_the_broker() {
    let broker = Broker::connect();
    let exchange = broker.own_exchange();
    let consumer = broker.consume(&exchange, "#");
    let (rt, mut publisher) = publisher_for(&exchange);
    assert_eq!(publisher.frame_max(), 131_072, "RabbitMQ's default");
    let batch = vec![message(1, None, "k"), with_headers(2, 200_000), message(3, None, "k")];
    let report = rt.block_on(publisher.publish_batch(batch));
    assert!(report.connection_lost.is_none(), "{report:?}");
    assert_eq!(failed(&report.outcomes[1]), Some(FailureKind::TooLarge), "{report:?}");
    assert_eq!((&report.outcomes[0], &report.outcomes[2]), (&Outcome::Confirmed, &Outcome::Confirmed));
    consumer.wait_for(2, WITHIN);
    consumer.expect_no_more(2, Duration::from_millis(300));
}

#[test]
fn a_frame_the_broker_refuses_is_pinned_on_its_message_by_publishing_suspects_alone() {
    // Pretending the broker takes larger frames, the publisher sends a header frame RabbitMQ
    // refuses: it closes the whole connection (501 FRAME_ERROR) without naming a message.
    let broker = Broker::connect();
    let exchange = broker.own_exchange();
    let consumer = broker.consume(&exchange, "#");
    let rt = Runtime::new().unwrap();
    let connect = || {
        let mut p = rt.block_on(Publisher::connect(config(&exchange))).unwrap();
        p.pretend_frame_max(1 << 20);
        p
    };
    let batch: Vec<OutboxMessage> =
        vec![message(1, None, "k"), message(2, None, "k"), with_headers(3, 200_000), message(4, None, "k")];
    let report = rt.block_on(connect().publish_batch(batch.clone()));
    let lost = report.connection_lost.clone().expect("the broker closes the connection");
    assert!(lost.refused && lost.reason.contains("501"), "{lost:?}");
    // If the messages before it were confirmed by then, the refused one was alone in flight and
    // is named at once; otherwise every unconfirmed message is a suspect. Messages not sent
    // yet are not attempted.
    let mut settled = Vec::new();
    let mut suspects = Vec::new();
    for (m, o) in batch.iter().zip(&report.outcomes) {
        match o {
            Outcome::Suspected { .. } | Outcome::NotAttempted => suspects.push(m.clone()),
            Outcome::Confirmed => settled.push((m.row_id, o.clone())),
            other => {
                assert_eq!(m.row_id, 3, "only the refused message fails: {report:?}");
                settled.push((m.row_id, other.clone()));
            }
        }
    }
    assert!(!matches!(report.outcomes[2], Outcome::NotAttempted), "it was sent: {report:?}");

    // The suspects again, each alone: the refusal now names its message, the rest go through.
    while !suspects.is_empty() {
        let handed = suspects.iter().cloned().map(|message| Handed { message, alone: true }).collect();
        let report = rt.block_on(connect().publish_handed(handed));
        let mut next = Vec::new();
        for (m, o) in suspects.iter().zip(report.outcomes) {
            match o {
                Outcome::NotAttempted => next.push(m.clone()),
                other => settled.push((m.row_id, other)),
            }
        }
        suspects = next;
    }
    for (row, outcome) in settled {
        if row == 3 {
            assert_eq!(failed(&outcome), Some(FailureKind::Refused), "{outcome:?}");
        } else {
            assert_eq!(outcome, Outcome::Confirmed, "row {row}");
        }
    }
    // Unconfirmed when the connection closed, a message may have arrived already: sent again,
    // it arrives twice (at least once). The refused one never arrives.
    consumer.wait_for(3, WITHIN);
    std::thread::sleep(Duration::from_millis(300));
    let ids: std::collections::BTreeSet<String> =
        consumer.received().iter().filter_map(|d| d.message_id.clone()).collect();
    assert_eq!(ids, ["m-1", "m-2", "m-4"].into_iter().map(String::from).collect());
}
