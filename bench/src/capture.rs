//! The cost of capturing a table (`outbox.capture`): INSERT and UPDATE of N rows in one
//! statement into a captured table, against the same into a table whose plain PL/pgSQL AFTER
//! ROW trigger inserts one audit row holding the same kind of jsonb (`{"new": ..., "old":
//! ...}`), and into a table without a trigger. The relay is paused, so only the writes are
//! measured.

use crate::{progress, Row};
use pg_outbox_tests::Cluster;
use std::time::Instant;

/// Rounds of alternating runs; each ratio reported is the median of the rounds' ratios.
const ROUNDS: usize = 3;
const VARIANTS: [&str; 3] = ["bare", "audit", "captured"];

pub fn capture(rows: i64) -> Vec<Row> {
    let cluster = Cluster::start(&crate::settings(&[]));
    cluster.wait_for_worker();
    cluster.cut_off_broker();
    let mut db = cluster.client();
    for table in VARIANTS {
        db.batch_execute(&format!(
            "CREATE TABLE {table} (id bigint PRIMARY KEY, status text NOT NULL, amount int NOT NULL, note text)"
        ))
        .unwrap();
    }
    db.batch_execute(
        "CREATE TABLE audit_log (id bigserial PRIMARY KEY, table_name text NOT NULL, op text NOT NULL, row_id text,
                                 payload jsonb NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp());
         CREATE FUNCTION audit_row() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO audit_log (table_name, op, row_id, payload)
             VALUES (TG_TABLE_NAME, TG_OP, CASE WHEN TG_OP = 'DELETE' THEN OLD.id ELSE NEW.id END::text,
                     jsonb_build_object('new', CASE WHEN TG_OP <> 'DELETE' THEN to_jsonb(NEW) END,
                                        'old', CASE WHEN TG_OP <> 'INSERT' THEN to_jsonb(OLD) END));
             RETURN NULL;
         END $$;
         CREATE TRIGGER audit AFTER INSERT OR UPDATE OR DELETE ON audit FOR EACH ROW EXECUTE FUNCTION audit_row();
         SELECT outbox.capture('captured');",
    )
    .unwrap();
    let reset = |db: &mut postgres::Client| {
        db.batch_execute("TRUNCATE bare, audit, captured, audit_log, outbox.messages; CHECKPOINT").unwrap();
    };
    let timed = |db: &mut postgres::Client, sql: &str| {
        let started = Instant::now();
        let n = db.execute(sql, &[]).unwrap();
        assert_eq!(n, rows as u64);
        rows as f64 / started.elapsed().as_secs_f64()
    };
    // (variant, "insert" | "update") -> rows/s per round
    let mut rates: std::collections::HashMap<(&str, &str), Vec<f64>> = Default::default();
    for round in 1..=ROUNDS {
        // Rotate the order each round, so that no variant gains from its place.
        for k in 0..VARIANTS.len() {
            let table = VARIANTS[(k + round) % VARIANTS.len()];
            reset(&mut db);
            let insert = timed(
                &mut db,
                &format!(
                    "INSERT INTO {table} SELECT g, 'new', g::int, 'note ' || g FROM generate_series(1, {rows}) g"
                ),
            );
            db.batch_execute(&format!("VACUUM ANALYZE {table}")).unwrap();
            let update = timed(&mut db, &format!("UPDATE {table} SET amount = amount + 1, status = 'paid'"));
            progress(&format!(
                "capture, round {round}, {table}: INSERT {insert:.0} rows/s, UPDATE {update:.0} rows/s"
            ));
            rates.entry((table, "insert")).or_default().push(insert);
            rates.entry((table, "update")).or_default().push(update);
        }
    }
    let events: i64 = db
        .query_one("SELECT count(*) FROM outbox.messages WHERE event_type = 'captured.updated'", &[])
        .unwrap()
        .get(0);
    assert_eq!(events, rows, "the last captured UPDATE wrote one event per row");
    reset(&mut db);
    let mean = |k: (&str, &str)| rates[&k].iter().sum::<f64>() / rates[&k].len() as f64;
    let median_ratio = |a: (&str, &str), b: (&str, &str)| {
        let mut r: Vec<f64> = rates[&a].iter().zip(&rates[&b]).map(|(x, y)| x / y).collect();
        r.sort_by(|x, y| x.partial_cmp(y).unwrap());
        r[r.len() / 2]
    };
    let mut out = Vec::new();
    for op in ["insert", "update"] {
        let statement = if op == "insert" { "INSERT" } else { "UPDATE" };
        out.push(Row {
            figure: format!("capture: {statement} of {rows} rows in one statement into a captured table"),
            value: format!("{:.0} rows/s", mean(("captured", op))),
            baseline: format!(
                "{:.0} rows/s with a plain PL/pgSQL AFTER trigger writing an audit row (jsonb); {:.0} rows/s without a trigger",
                mean(("audit", op)),
                mean(("bare", op))
            ),
            ratio: Some(median_ratio(("captured", op), ("audit", op))),
            target: "reported (ratio to the audit trigger)".into(),
            met: None,
        });
        out.push(Row {
            figure: format!("capture: the same {statement}, captured vs no trigger"),
            value: format!("{:.0} rows/s", mean(("captured", op))),
            baseline: format!("{:.0} rows/s without a trigger", mean(("bare", op))),
            ratio: Some(median_ratio(("captured", op), ("bare", op))),
            target: "reported".into(),
            met: None,
        });
    }
    out
}
