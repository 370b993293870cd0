//! Capture triggers (`outbox.capture`): a table's row changes arrive at a real consumer as
//! events, in commit order per row, published by roles that have no outbox privilege, and
//! only tables their owners chose are captured.

use pg_outbox_tests::*;
use postgres::Client;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::Duration;

const WITHIN: Duration = Duration::from_secs(60);

/// The SQLSTATE of a failed statement.
fn sqlstate(result: Result<impl std::fmt::Debug, postgres::Error>) -> String {
    let err = result.expect_err("the statement should fail");
    err.as_db_error().map(|e| e.code().code().to_string()).unwrap_or_else(|| panic!("{err}"))
}

fn by_type<'a>(got: &'a [Delivery], event_type: &str) -> Vec<&'a Delivery> {
    got.iter().filter(|d| d.message_type.as_deref() == Some(event_type)).collect()
}

#[test]
fn row_changes_arrive_as_events() {
    let cluster = Cluster::start(&[]);
    let broker = Broker::connect();
    let exchange = broker.own_exchange();
    let consumer = broker.consume(&exchange, "#");
    let mut db = cluster.client();
    db.batch_execute(
        "CREATE TABLE orders (id int PRIMARY KEY, status text, total numeric, note text);
         CREATE TABLE lines (order_id int, line text, qty int, PRIMARY KEY (order_id, line));",
    )
    .unwrap();
    db.execute("SELECT outbox.capture('orders', 'shop.order', 'order', exchange => $1)", &[&exchange.name])
        .unwrap();
    db.execute("SELECT outbox.capture('lines', exchange => $1)", &[&exchange.name]).unwrap();

    db.batch_execute("INSERT INTO orders VALUES (1, 'new', 10.5, 'gift'), (2, 'new', 3, NULL)").unwrap();
    db.batch_execute("UPDATE orders SET status = 'paid', total = 11 WHERE id = 1").unwrap();
    // Nothing captured changes: no event.
    db.batch_execute("UPDATE orders SET status = status").unwrap();
    // A rolled-back change publishes nothing.
    let mut tx = db.transaction().unwrap();
    tx.batch_execute("INSERT INTO orders VALUES (99, 'ghost', 0, NULL); DELETE FROM orders WHERE id = 2")
        .unwrap();
    tx.rollback().unwrap();
    // A new key: the old aggregate is deleted, the new one inserted.
    db.batch_execute("UPDATE orders SET id = 3 WHERE id = 2").unwrap();
    db.batch_execute("DELETE FROM orders WHERE id = 1").unwrap();
    db.batch_execute("INSERT INTO lines VALUES (3, 'a \"b\"', 2)").unwrap();
    db.batch_execute("TRUNCATE orders").unwrap();

    let got = consumer.wait_for(8, WITHIN);
    // Commit order holds per aggregate (events of different aggregates may pass each other).
    let stream = |id: Option<&str>| -> Vec<&str> {
        got.iter()
            .filter(|d| d.header("aggregate_id") == id)
            .map(|d| d.message_type.as_deref().unwrap())
            .collect()
    };
    assert_eq!(stream(Some("1")), ["shop.order.inserted", "shop.order.updated", "shop.order.deleted"]);
    assert_eq!(stream(Some("2")), ["shop.order.inserted", "shop.order.deleted"]);
    assert_eq!(stream(Some("3")), ["shop.order.inserted"]);
    assert_eq!(stream(Some(r#"[3, "a \"b\""]"#)), ["lines.inserted"]);
    assert_eq!(stream(None), ["shop.order.truncated"]);
    assert_eq!(got.len(), 8);
    for d in &got {
        assert_eq!(d.routing_key, d.message_type.clone().unwrap(), "routing key = event type");
        assert_eq!(d.exchange, *exchange);
    }
    let updated = by_type(&got, "shop.order.updated");
    assert_eq!(updated.len(), 1);
    assert_eq!(updated[0].header("aggregate_type"), Some("order"));
    assert_eq!(
        updated[0].json(),
        json!({"new": {"id": 1, "status": "paid", "total": 11, "note": "gift"},
               "old": {"id": 1, "status": "new", "total": 10.5, "note": "gift"},
               "changed": ["status", "total"]})
    );
    let inserted = by_type(&got, "shop.order.inserted");
    assert_eq!(
        inserted[0].json(),
        json!({"new": {"id": 1, "status": "new", "total": 10.5, "note": "gift"}, "old": null})
    );
    assert_eq!(
        inserted[2].json(),
        json!({"new": {"id": 3, "status": "new", "total": 3, "note": null}, "old": null})
    );
    let deleted = by_type(&got, "shop.order.deleted");
    assert_eq!(deleted[0].header("aggregate_id"), Some("2"));
    assert_eq!(
        deleted[0].json(),
        json!({"new": null, "old": {"id": 2, "status": "new", "total": 3, "note": null}})
    );
    let truncated = by_type(&got, "shop.order.truncated");
    assert_eq!(truncated[0].json(), json!({}));
    assert_eq!(truncated[0].header("aggregate_id"), None);
    let line = by_type(&got, "lines.inserted");
    assert_eq!(line[0].header("aggregate_type"), Some("lines"));
    assert_eq!(line[0].json(), json!({"new": {"order_id": 3, "line": "a \"b\"", "qty": 2}, "old": null}));

    // Capturing again replaces the options: only some columns now; the key is always read.
    db.execute(
        "SELECT outbox.capture('orders', 'shop.order', 'order', columns => ARRAY['status'], exchange => $1)",
        &[&exchange.name],
    )
    .unwrap();
    let captured = db
        .query_one(
            "SELECT event_type_prefix, aggregate_type, key_columns, columns, exchange, enabled FROM outbox.captured WHERE table_name = 'orders'::regclass",
            &[],
        )
        .unwrap();
    assert_eq!(captured.get::<_, String>(0), "shop.order");
    assert_eq!(captured.get::<_, String>(1), "order");
    assert_eq!(captured.get::<_, Vec<String>>(2), ["id"]);
    assert_eq!(captured.get::<_, Option<Vec<String>>>(3), Some(vec!["status".to_string()]));
    assert_eq!(captured.get::<_, Option<String>>(4).as_deref(), Some(&*exchange.name));
    assert!(captured.get::<_, bool>(5));
    db.batch_execute("INSERT INTO orders VALUES (5, 'new', 1, 'n')").unwrap();
    db.batch_execute("UPDATE orders SET note = 'only the note', total = 2").unwrap(); // no captured change
    db.batch_execute("UPDATE orders SET status = 'sent'").unwrap();
    let got = consumer.wait_for(10, WITHIN);
    assert_eq!(got[8].json(), json!({"new": {"status": "new"}, "old": null}));
    assert_eq!(got[8].header("aggregate_id"), Some("5"));
    assert_eq!(
        got[9].json(),
        json!({"new": {"status": "sent"}, "old": {"status": "new"}, "changed": ["status"]})
    );

    // Uncaptured: nothing more.
    db.batch_execute("SELECT outbox.uncapture('orders'); SELECT outbox.uncapture('lines')").unwrap();
    assert_eq!(db.query_one("SELECT count(*) FROM outbox.captured", &[]).unwrap().get::<_, i64>(0), 0);
    db.batch_execute("UPDATE orders SET status = 'gone'; TRUNCATE lines").unwrap();
    cluster.wait_drained(WITHIN);
    consumer.expect_no_more(10, Duration::from_secs(1));
}

#[test]
fn each_rows_events_arrive_in_commit_order_under_concurrent_writers() {
    let cluster = Cluster::start(&[]);
    let broker = Broker::connect();
    let exchange = broker.own_exchange();
    let consumer = broker.consume(&exchange, "#");
    let mut db = cluster.client();
    const ROWS: i32 = 5;
    const WRITERS: usize = 4;
    const UPDATES: usize = 50;
    db.batch_execute(&format!(
        "CREATE TABLE counters (id int PRIMARY KEY, n int NOT NULL, writer int);
         INSERT INTO counters SELECT g, 0, NULL FROM generate_series(1, {ROWS}) g;"
    ))
    .unwrap();
    db.execute("SELECT outbox.capture('counters', exchange => $1)", &[&exchange.name]).unwrap();
    std::thread::scope(|s| {
        for w in 0..WRITERS {
            let cluster = &cluster;
            s.spawn(move || {
                let mut db = cluster.client();
                for i in 0..UPDATES {
                    // Two rows per transaction, in an order that varies, so transactions
                    // overlap on rows in every way (deadlocks are retried).
                    let (a, b) =
                        (((w + i) % ROWS as usize) as i32 + 1, ((w * 3 + i * 7) % ROWS as usize) as i32 + 1);
                    loop {
                        let mut tx = db.transaction().unwrap();
                        let r = tx
                            .execute(
                                "UPDATE counters SET n = n + 1, writer = $2 WHERE id = $1",
                                &[&a, &(w as i32)],
                            )
                            .and_then(|_| {
                                tx.execute(
                                    "UPDATE counters SET n = n + 1, writer = $2 WHERE id = $1",
                                    &[&b, &(w as i32)],
                                )
                            });
                        match r {
                            Ok(_) => {
                                tx.commit().unwrap();
                                break;
                            }
                            Err(e) if e.code() == Some(&postgres::error::SqlState::T_R_DEADLOCK_DETECTED) => {
                                continue
                            }
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
            });
        }
    });
    let total: i64 = db.query_one("SELECT sum(n) FROM counters", &[]).unwrap().get(0);
    assert_eq!(total, (WRITERS * UPDATES * 2) as i64);
    let got = consumer.wait_for(total as usize, Duration::from_secs(120));
    let mut seen: HashMap<String, Vec<i64>> = HashMap::new();
    for d in &got {
        let n = d.json()["new"]["n"].as_i64().unwrap();
        seen.entry(d.header("aggregate_id").unwrap().to_string()).or_default().push(n);
    }
    for (id, ns) in &seen {
        // Each update added one to the committed value: commit order is 1, 2, 3, ...
        let expected: Vec<i64> = (1..=ns.len() as i64).collect();
        assert_eq!(ns, &expected, "row {id}: events out of commit order");
    }
    cluster.wait_drained(WITHIN);
}

fn roles(db: &mut Client) {
    db.batch_execute(
        "CREATE ROLE app_owner LOGIN; CREATE ROLE intruder LOGIN; CREATE ROLE writer LOGIN;
         GRANT CREATE ON SCHEMA public TO app_owner;
         GRANT EXECUTE ON FUNCTION outbox.capture, outbox.uncapture, outbox.capture_row TO app_owner;
         GRANT EXECUTE ON FUNCTION outbox.capture, outbox.uncapture TO intruder;",
    )
    .unwrap();
}

#[test]
fn only_owners_capture_and_writers_need_no_outbox_privilege() {
    let cluster = Cluster::start(&[]);
    let broker = Broker::connect();
    let exchange = broker.own_exchange();
    let consumer = broker.consume(&exchange, "#");
    let mut admin = cluster.client();
    roles(&mut admin);
    let mut owner = cluster.connect_as(DB, "app_owner");
    // A type of the owner's with a cast to json: converting the row runs it, as whoever
    // changes the row (here: writer), never as the extension's owner.
    owner
        .batch_execute(
            "CREATE TYPE mood AS ENUM ('happy', 'sad');
             CREATE FUNCTION mood_json(mood) RETURNS json LANGUAGE sql
                 AS $$ SELECT json_build_object('mood', $1::text, 'as', current_user::text) $$;
             CREATE CAST (mood AS json) WITH FUNCTION mood_json(mood);
             CREATE TABLE accounts (id text PRIMARY KEY, balance int, mood mood);
             GRANT SELECT, INSERT, UPDATE, DELETE ON accounts TO writer;
             GRANT TRIGGER ON accounts TO intruder;",
        )
        .unwrap();
    owner.execute("SELECT outbox.capture('accounts', exchange => $1)", &[&exchange.name]).unwrap();

    // A role with TRIGGER on the table and EXECUTE on capture is not its owner.
    let mut intruder = cluster.connect_as(DB, "intruder");
    assert_eq!(sqlstate(intruder.batch_execute("SELECT outbox.uncapture('accounts')")), "42501");
    owner.batch_execute("SELECT outbox.uncapture('accounts')").unwrap();
    assert_eq!(
        sqlstate(intruder.execute("SELECT outbox.capture('accounts', exchange => $1)", &[&exchange.name])),
        "42501"
    );
    // Nor can it create the trigger itself: CREATE TRIGGER needs EXECUTE on capture_row.
    assert_eq!(
        sqlstate(intruder.batch_execute(
            "CREATE TRIGGER t AFTER INSERT ON accounts FOR EACH ROW EXECUTE FUNCTION outbox.capture_row('prefix=x', 'aggregate_type=x', 'key=id')"
        )),
        "42501"
    );
    // Nor call anything that writes events.
    assert_eq!(sqlstate(intruder.batch_execute("SELECT outbox.publish('x', '{}')")), "42501");
    owner.execute("SELECT outbox.capture('accounts', exchange => $1)", &[&exchange.name]).unwrap();

    // A role that may only change the table's rows publishes its changes.
    let mut writer = cluster.connect_as(DB, "writer");
    assert_eq!(sqlstate(writer.batch_execute("SELECT outbox.publish('x', '{}')")), "42501");
    writer
        .batch_execute("INSERT INTO accounts VALUES ('a-1', 100, 'happy'); UPDATE accounts SET balance = 50")
        .unwrap();
    assert_eq!(sqlstate(writer.batch_execute("SELECT outbox.capture('accounts')")), "42501");
    let got = consumer.wait_for(2, WITHIN);
    assert_eq!(got[0].message_type.as_deref(), Some("accounts.inserted"));
    assert_eq!(got[0].json()["new"]["mood"], json!({"mood": "happy", "as": "writer"}));
    assert_eq!(got[1].json()["changed"], json!(["balance"]));
    assert_eq!(got[1].header("aggregate_id"), Some("a-1"));

    // Misuse, each with its SQLSTATE.
    owner
        .batch_execute(
            "CREATE TABLE nokey (a int, b int);
             CREATE VIEW v AS SELECT * FROM accounts;
             CREATE TABLE parted (id int PRIMARY KEY) PARTITION BY RANGE (id);
             CREATE TABLE parted_1 PARTITION OF parted FOR VALUES FROM (0) TO (10);",
        )
        .unwrap();
    for (statement, code) in [
        ("SELECT outbox.capture('nokey')", "22023"),
        ("SELECT outbox.capture('nokey', key_columns => '{}')", "22023"),
        ("SELECT outbox.capture('nokey', key_columns => ARRAY['c'])", "42703"),
        ("SELECT outbox.capture('nokey', key_columns => ARRAY['a'], columns => ARRAY['zz'])", "42703"),
        ("SELECT outbox.capture('nokey', key_columns => ARRAY['a', 'a'])", "22023"),
        ("SELECT outbox.capture('nokey', '', key_columns => ARRAY['a'])", "22023"),
        ("SELECT outbox.capture('nokey', repeat('x', 246), key_columns => ARRAY['a'])", "22001"),
        ("SELECT outbox.capture('v')", "42809"),
        ("SELECT outbox.capture('parted_1')", "42809"),
        ("SELECT outbox.capture('outbox.messages')", "42809"),
        ("SELECT outbox.uncapture('nokey')", "42704"),
        ("SELECT outbox.capture(NULL)", "22004"),
    ] {
        assert_eq!(sqlstate(owner.batch_execute(statement)), code, "{statement}");
    }
    // The trigger function is for triggers only.
    assert_eq!(sqlstate(owner.batch_execute("SELECT outbox.capture_row()")), "39P01");
    // A key column renamed after capturing: writes fail (nothing unordered is published)
    // until the table is captured again.
    owner.batch_execute("ALTER TABLE accounts RENAME COLUMN id TO account_id").unwrap();
    assert_eq!(sqlstate(writer.batch_execute("UPDATE accounts SET balance = 1")), "42703");
    owner.execute("SELECT outbox.capture('accounts', exchange => $1)", &[&exchange.name]).unwrap();
    writer.batch_execute("UPDATE accounts SET balance = 1").unwrap();
    let got = consumer.wait_for(3, WITHIN);
    assert_eq!(got[2].json()["new"]["account_id"], json!("a-1"));
    // DROP TABLE takes its capture with it.
    owner.batch_execute("DROP TABLE accounts CASCADE").unwrap();
    assert_eq!(admin.query_one("SELECT count(*) FROM outbox.captured", &[]).unwrap().get::<_, i64>(0), 0);
    cluster.wait_drained(WITHIN);
    consumer.expect_no_more(3, Duration::from_millis(500));
}

#[test]
fn a_partitioned_table_is_captured_with_every_partition() {
    let cluster = Cluster::start(&[]);
    let broker = Broker::connect();
    let exchange = broker.own_exchange();
    let consumer = broker.consume(&exchange, "#");
    let mut db = cluster.client();
    db.batch_execute(
        "CREATE TABLE events (id int, day int, v text, PRIMARY KEY (id, day)) PARTITION BY RANGE (day);
         CREATE TABLE events_1 PARTITION OF events FOR VALUES FROM (1) TO (2);",
    )
    .unwrap();
    db.execute(
        "SELECT outbox.capture('events', key_columns => ARRAY['id'], exchange => $1)",
        &[&exchange.name],
    )
    .unwrap();
    // A partition made after capturing is captured too.
    db.batch_execute("CREATE TABLE events_2 PARTITION OF events FOR VALUES FROM (2) TO (3)").unwrap();
    db.batch_execute("INSERT INTO events VALUES (1, 1, 'a'), (2, 2, 'b')").unwrap();
    db.batch_execute("UPDATE events SET v = 'c' WHERE id = 2").unwrap();
    // Moving a row to another partition is a delete and an insert (Postgres fires those).
    db.batch_execute("UPDATE events SET day = 2 WHERE id = 1").unwrap();
    db.batch_execute("TRUNCATE events").unwrap();
    let got = consumer.wait_for(6, WITHIN);
    let types: Vec<&str> = got.iter().map(|d| d.message_type.as_deref().unwrap()).collect();
    let mut sorted = types.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        [
            "events.deleted",
            "events.inserted",
            "events.inserted",
            "events.inserted",
            "events.truncated",
            "events.updated"
        ]
    );
    let updated = by_type(&got, "events.updated");
    assert_eq!(updated[0].json()["changed"], json!(["v"]));
    let moved: Vec<&Delivery> = got.iter().filter(|d| d.header("aggregate_id") == Some("1")).collect();
    let moved_types: Vec<&str> = moved.iter().map(|d| d.message_type.as_deref().unwrap()).collect();
    assert_eq!(moved_types, ["events.inserted", "events.deleted", "events.inserted"]);
    let listed: Vec<String> = db
        .query("SELECT table_name::text FROM outbox.captured", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(listed, ["events"]);
    db.batch_execute("SELECT outbox.uncapture('events')").unwrap();
    assert_eq!(
        db.query_one(
            "SELECT count(*) FROM pg_trigger WHERE tgfoid = 'outbox.capture_row()'::regprocedure",
            &[]
        )
        .unwrap()
        .get::<_, i64>(0),
        0
    );
}

#[test]
fn a_bulk_update_of_100000_rows_stays_within_the_lock_budget() {
    const ROWS: i64 = 100_000;
    let cluster = Cluster::start(&[]);
    let broker = Broker::connect();
    let exchange = broker.own_exchange();
    let consumer = broker.consume(&exchange, "#");
    let mut db = cluster.client();
    db.batch_execute(&format!(
        "CREATE TABLE items (id bigint PRIMARY KEY, price int NOT NULL);
         INSERT INTO items SELECT g, 1 FROM generate_series(1, {ROWS}) g;"
    ))
    .unwrap();
    db.execute("SELECT outbox.capture('items', exchange => $1)", &[&exchange.name]).unwrap();
    let default_locks: String = db.query_one("SHOW max_locks_per_transaction", &[]).unwrap().get(0);
    assert_eq!(default_locks, "64");
    let pid: i32 = db.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    let mut tx = db.transaction().unwrap();
    assert_eq!(tx.execute("UPDATE items SET price = price + 1", &[]).unwrap(), ROWS as u64);
    // Still open: count the locks it holds.
    let locks: i64 = cluster
        .client()
        .query_one("SELECT count(*) FROM pg_locks WHERE pid = $1 AND locktype = 'advisory'", &[&pid])
        .unwrap()
        .get(0);
    assert!(locks > 0 && locks <= 320, "{locks} advisory locks");
    tx.commit().unwrap();
    let written: i64 = db.query_one("SELECT count(*) FROM outbox.messages", &[]).unwrap().get(0);
    assert!(written <= ROWS, "{written}");
    let got = consumer.wait_for(ROWS as usize, Duration::from_secs(300));
    let (unique, _) = dedup(&got);
    assert_eq!(unique.len(), ROWS as usize);
    assert!(got.iter().all(|d| d.message_type.as_deref() == Some("items.updated")));
    assert_eq!(got[0].json()["changed"], Value::from(vec!["price"]));
    cluster.wait_drained(WITHIN);
}
