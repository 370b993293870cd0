//! What an operator and a tracing system see: `outbox.metrics` and `outbox.metrics_text()`
//! count what really happened (per exchange, from the event's commit, across worker restarts),
//! `outbox.stats` reads without a scan, and `SET LOCAL outbox.headers` carries trace context to
//! a real consumer. Real cluster, real RabbitMQ, real consumer, a second role.

use pg_outbox_tests::*;
use postgres::error::SqlState;
use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

const WITHIN: Duration = Duration::from_secs(60);

/// The value of metric `name` with `exchange` (or none) and `le` (or none).
fn metric(db: &mut postgres::Client, name: &str, exchange: Option<&str>, le: Option<&str>) -> Option<f64> {
    db.query_opt(
        "SELECT value FROM outbox.metrics WHERE name = $1 AND exchange IS NOT DISTINCT FROM $2 AND le IS NOT DISTINCT FROM $3",
        &[&name, &exchange, &le],
    )
    .unwrap()
    .map(|r| r.get(0))
}

fn publish(db: &mut impl postgres::GenericClient, exchange: &str, n: i32) {
    db.execute(
        "SELECT outbox.publish('Counted', jsonb_build_object('n', n), aggregate_id => n::text, exchange => $1)
           FROM generate_series(1, $2) n",
        &[&exchange, &n],
    )
    .unwrap();
}

#[test]
fn metrics_count_per_exchange_from_the_commit_and_survive_a_worker_restart() {
    let cluster = Cluster::start(&quick_retries("1"));
    let broker = Broker::connect();
    let routed = broker.own_exchange();
    let nowhere = broker.own_exchange();
    let consumer = broker.consume(&routed, "#");
    let mut db = cluster.client();
    cluster.wait_for_worker();

    publish(&mut db, &routed, 5);
    // No queue is bound to `nowhere`: each of its events fails once and is dead-lettered.
    publish(&mut db, &nowhere, 2);
    consumer.wait_for(5, WITHIN);
    wait_until(WITHIN, "both unroutable events to be dead-lettered", || {
        (metric(&mut db, "outbox_dead_lettered_total", Some(&nowhere), None) == Some(2.0)).then_some(())
    });
    wait_until(WITHIN, "the confirms to be recorded", || {
        (metric(&mut db, "outbox_published_total", Some(&routed), None) == Some(5.0)).then_some(())
    });
    assert_eq!(metric(&mut db, "outbox_failed_attempts_total", Some(&nowhere), None), Some(2.0));
    assert_eq!(metric(&mut db, "outbox_failed_attempts_total", Some(&routed), None), Some(0.0));
    assert_eq!(metric(&mut db, "outbox_published_total", Some(&nowhere), None), Some(0.0));
    assert_eq!(metric(&mut db, "outbox_commit_to_confirm_seconds_count", None, None), Some(5.0));
    assert_eq!(metric(&mut db, "outbox_commit_to_confirm_seconds_bucket", None, Some("+Inf")), Some(5.0));
    assert_eq!(metric(&mut db, "outbox_wait_seconds_count", None, None), Some(7.0), "every first attempt");
    assert_eq!(metric(&mut db, "outbox_worker_up", None, None), Some(1.0));
    assert_eq!(metric(&mut db, "outbox_broker_connected", None, None), Some(1.0));
    assert_eq!(metric(&mut db, "outbox_in_flight", None, None), Some(0.0));
    assert!(metric(&mut db, "outbox_broker_connections_total", None, None).unwrap() >= 1.0);
    // Labels as a JSON object, for exporters that take one column.
    let labels: serde_json::Value = db
        .query_one(
            "SELECT labels FROM outbox.metrics WHERE name = 'outbox_published_total' AND exchange = $1",
            &[&routed.name],
        )
        .unwrap()
        .get(0);
    assert_eq!(labels, serde_json::json!({"database": DB, "exchange": routed.name}));

    // A new worker goes on counting.
    let pid = cluster.wait_for_worker();
    cluster.admin().execute("SELECT pg_terminate_backend($1)", &[&pid]).unwrap();
    wait_until(WITHIN, "a new worker", || cluster.worker_pid().filter(|p| *p != pid));
    assert_eq!(
        metric(&mut db, "outbox_published_total", Some(&routed), None),
        Some(5.0),
        "kept across the restart"
    );
    publish(&mut db, &routed, 1);
    consumer.wait_for(6, WITHIN);
    wait_until(WITHIN, "the sixth confirm to be counted", || {
        (metric(&mut db, "outbox_published_total", Some(&routed), None) == Some(6.0)).then_some(())
    });
    assert_eq!(metric(&mut db, "outbox_dead_lettered_total", Some(&nowhere), None), Some(2.0));
    let stats = db.query_one("SELECT published_total, dead_lettered_total FROM outbox.stats", &[]).unwrap();
    assert_eq!(
        (stats.get::<_, i64>(0), stats.get::<_, i64>(1)),
        (6, 2),
        "outbox.stats counts from the server's start too"
    );
}

#[test]
fn latency_is_measured_from_the_commit_not_the_insert() {
    let cluster = Cluster::start(&[]);
    let broker = Broker::connect();
    let exchange = broker.own_exchange();
    let consumer = broker.consume(&exchange, "#");
    let mut db = cluster.client();
    cluster.wait_for_worker();
    // Written 8 s before its transaction commits: measured from the insert, it would be in no
    // bucket below 10 s.
    let mut tx = db.transaction().unwrap();
    publish(&mut tx, &exchange, 1);
    tx.batch_execute("SELECT pg_sleep(8)").unwrap();
    tx.commit().unwrap();
    consumer.wait_for(1, WITHIN);
    wait_until(WITHIN, "the confirm to be counted", || {
        (metric(&mut db, "outbox_commit_to_confirm_seconds_count", None, None) == Some(1.0)).then_some(())
    });
    assert_eq!(metric(&mut db, "outbox_commit_to_confirm_seconds_bucket", None, Some("5")), Some(1.0));
    assert_eq!(metric(&mut db, "outbox_wait_seconds_bucket", None, Some("5")), Some(1.0));
    let sum = metric(&mut db, "outbox_commit_to_confirm_seconds_sum", None, None).unwrap();
    assert!(sum > 0.0 && sum < 5.0, "{sum}");
}

#[test]
fn metrics_text_is_the_prometheus_format_and_only_monitors_read_it() {
    let cluster = Cluster::start(&[]);
    let broker = Broker::connect();
    let exchange = broker.own_exchange();
    let consumer = broker.consume(&exchange, "#");
    let mut db = cluster.client();
    cluster.wait_for_worker();
    publish(&mut db, &exchange, 3);
    consumer.wait_for(3, WITHIN);
    let text: String = wait_until(WITHIN, "three confirms in the text", || {
        let text: String = db.query_one("SELECT outbox.metrics_text()", &[]).unwrap().get(0);
        text.contains(&format!(
            "outbox_published_total{{database=\"{DB}\",exchange=\"{}\"}} 3\n",
            exchange.name
        ))
        .then_some(text)
    });
    // Every family has one HELP and one TYPE line, before its samples; samples of a family are
    // together; histogram buckets are cumulative and end with +Inf.
    let mut seen = HashSet::new();
    let mut current = String::new();
    let mut buckets: BTreeMap<String, Vec<(String, f64)>> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            current = rest.split(' ').next().unwrap().to_string();
            assert!(seen.insert(current.clone()), "{current} described twice");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            assert_eq!(parts.next(), Some(current.as_str()));
            assert!(matches!(parts.next(), Some("counter" | "gauge" | "histogram")), "{line}");
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {line}"));
        let value: f64 = if value == "+Inf" { f64::INFINITY } else { value.parse().unwrap() };
        let name = series.split('{').next().unwrap();
        assert!(name.starts_with(&current), "{name} outside its family {current}");
        assert!(series.contains(&format!("database=\"{DB}\"")), "{line}");
        if name.ends_with("_bucket") {
            let le = series.split("le=\"").nth(1).unwrap().split('"').next().unwrap();
            buckets.entry(name.to_string()).or_default().push((le.to_string(), value));
        }
    }
    for name in [
        "outbox_pending",
        "outbox_oldest_pending_age_seconds",
        "outbox_retrying",
        "outbox_dead_letters",
        "outbox_broker_connected",
        "outbox_in_flight",
        "outbox_reconnects_total",
        "outbox_failed_attempts_total",
        "outbox_dead_lettered_total",
        "outbox_commit_to_confirm_seconds",
        "outbox_wait_seconds",
    ] {
        assert!(seen.contains(name), "{name} missing from\n{text}");
    }
    for (name, b) in &buckets {
        assert_eq!(b.first().unwrap().0, "0.0005", "{name}");
        assert_eq!(b.last().unwrap().0, "+Inf", "{name}");
        assert!(b.windows(2).all(|w| w[0].1 <= w[1].1), "{name} is cumulative: {b:?}");
    }
    assert_eq!(buckets["outbox_commit_to_confirm_seconds_bucket"].last().unwrap().1, 3.0);

    // A monitoring role reads both; any other role neither.
    cluster
        .admin()
        .batch_execute(
            "CREATE ROLE watcher LOGIN IN ROLE pg_monitor; CREATE ROLE nosy LOGIN;
             GRANT CONNECT ON DATABASE app TO watcher, nosy",
        )
        .unwrap();
    let mut watcher = cluster.connect_as(DB, "watcher");
    let n: i64 = watcher.query_one("SELECT count(*) FROM outbox.metrics", &[]).unwrap().get(0);
    assert!(n > 40, "{n}");
    watcher.query_one("SELECT outbox.metrics_text(), outbox.exact_counts()", &[]).unwrap();
    let mut nosy = cluster.connect_as(DB, "nosy");
    for sql in [
        "SELECT * FROM outbox.metrics",
        "SELECT outbox.metrics_text()",
        "SELECT outbox.exact_counts()",
        "SELECT * FROM outbox.worker_metrics()",
    ] {
        let e = nosy.query(sql, &[]).unwrap_err();
        assert_eq!(e.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{sql}");
    }
    // outbox.stats stays readable by everyone.
    nosy.query_one("SELECT pending, retrying, dead_letters FROM outbox.stats", &[]).unwrap();
}

#[test]
fn pending_is_estimated_without_a_scan_and_counted_exactly_on_request() {
    let cluster = Cluster::start(&[("outbox.amqp_url", &unreachable_broker_url())]);
    let mut db = cluster.client();
    db.execute("SELECT outbox.publish('Waiting', '{}') FROM generate_series(1, 1000)", &[]).unwrap();
    let exact =
        db.query_one("SELECT pending, retrying, dead_letters FROM outbox.exact_counts()", &[]).unwrap();
    assert_eq!((exact.get::<_, i64>(0), exact.get::<_, i64>(1), exact.get::<_, i64>(2)), (1000, 0, 0));
    // The statistics system learns of the inserts within a second or so of the commit.
    wait_until(WITHIN, "the estimate to see the 1000 events", || {
        let pending: i64 =
            cluster.client().query_one("SELECT pending FROM outbox.stats", &[]).unwrap().get(0);
        (pending == 1000).then_some(())
    });
    wait_until(WITHIN, "the metric too", || {
        (metric(&mut db, "outbox_pending", None, None) == Some(1000.0)).then_some(())
    });
    let age = metric(&mut db, "outbox_oldest_pending_age_seconds", None, None).unwrap();
    assert!(age > 0.0, "{age}");
    assert_eq!(metric(&mut db, "outbox_broker_connected", None, None), Some(0.0));
    wait_until(WITHIN, "failed connection attempts to be counted", || {
        (metric(&mut db, "outbox_broker_connect_failures_total", None, None).unwrap_or(0.0) >= 1.0)
            .then_some(())
    });
}

#[test]
fn ambient_headers_reach_the_consumer_and_an_events_own_headers_win() {
    let cluster = Cluster::start(&[]);
    let broker = Broker::connect();
    let exchange = broker.own_exchange();
    let consumer = broker.consume(&exchange, "#");
    let mut db = cluster.client();
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    let mut tx = db.transaction().unwrap();
    tx.batch_execute(&format!(
        r#"SET LOCAL outbox.headers = '{{"traceparent": "{traceparent}", "tracestate": "vendor=1", "tenant": "acme"}}'"#
    ))
    .unwrap();
    tx.execute(
        "SELECT outbox.publish('Traced', '{\"n\": 1}', aggregate_id => 'a', exchange => $1)",
        &[&exchange.name],
    )
    .unwrap();
    tx.execute(
        "CALL outbox.process_transaction('Traced', '{\"n\": 2}', headers => '{\"tenant\": \"own\", \"extra\": 7}', exchange => $1)",
        &[&exchange.name],
    )
    .unwrap();
    tx.commit().unwrap();
    // SET LOCAL ended with the transaction.
    db.execute("SELECT outbox.publish('Untraced', '{\"n\": 3}', exchange => $1)", &[&exchange.name]).unwrap();

    let got = consumer.wait_for(3, WITHIN);
    let by_n: BTreeMap<i64, &Delivery> = got.iter().map(|d| (d.json()["n"].as_i64().unwrap(), d)).collect();
    let first = by_n[&1];
    assert_eq!(first.header("traceparent"), Some(traceparent));
    assert_eq!(first.header("tracestate"), Some("vendor=1"));
    assert_eq!(first.header("tenant"), Some("acme"));
    assert_eq!(first.header("aggregate_id"), Some("a"));
    let second = by_n[&2];
    assert_eq!(second.header("tenant"), Some("own"), "the event's own header wins");
    assert_eq!(second.header("extra"), Some("7"));
    assert_eq!(second.header("traceparent"), Some(traceparent));
    assert!(by_n[&3].headers.is_empty(), "{:?}", by_n[&3].headers);

    // Bad values are refused when set, with the SQLSTATE of a bad setting; nothing changes.
    // Nor may it route copies elsewhere (RabbitMQ's CC and BCC headers).
    for bad in
        [r#"[1]"#, r#"{"aggregate_id": "x"}"#, "{", r#"{"n": 18446744073709551615}"#, r#"{"BCC": ["k"]}"#]
    {
        let e = db.batch_execute(&format!("SET outbox.headers = '{bad}'")).unwrap_err();
        assert_eq!(e.code(), Some(&SqlState::INVALID_PARAMETER_VALUE), "{bad}: {e}");
    }
    let shown: String = db.query_one("SHOW outbox.headers", &[]).unwrap().get(0);
    assert_eq!(shown, "");
    // A session-wide setting applies to every transaction of the session, and an event whose
    // headers become too large for a frame is refused as before.
    db.batch_execute(&format!(r#"SET outbox.headers = '{{"big": "{}"}}'"#, "x".repeat(200_000))).unwrap();
    let e = db.execute("SELECT outbox.publish('Big', '{}', exchange => $1)", &[&exchange.name]).unwrap_err();
    assert_eq!(e.code(), Some(&SqlState::PROGRAM_LIMIT_EXCEEDED), "{e}");
    assert_eq!(cluster.pending(), 0, "nothing written");
}
