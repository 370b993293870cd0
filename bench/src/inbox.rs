//! The inbox: claims per second through `outbox.inbox_claim`, for new message ids and for
//! duplicates, against the same `INSERT ... ON CONFLICT DO NOTHING` into a plain table of the
//! same shape (same columns, primary key and expiry index), in the same cluster and run; and
//! how fast the worker removes expired claims, against one `DELETE` of the same rows.

use crate::{progress, Row};
use pg_outbox_tests::{wait_until, Cluster};
use std::time::{Duration, Instant};

/// Ids claimed beforehand, which the duplicate runs claim again.
const CLAIMED: i64 = 100_000;
const CLIENTS: u32 = 4;
/// Rounds of alternating runs; the ratio reported is the median of each round's ratio.
const ROUNDS: usize = 3;
/// Expired claims the worker removes in the clean-up figure.
const EXPIRED: i64 = 100_000;

const PLAIN: &str = "CREATE TABLE plain_inbox (
    consumer   text        NOT NULL,
    message_id uuid        NOT NULL,
    claimed_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (consumer, message_id));
CREATE INDEX ON plain_inbox (claimed_at);";

/// pgbench with `script`, `seconds` long, synchronous_commit off (the CPU sets the pace, so
/// that the function's own cost shows); transactions per second.
fn pgbench(cluster: &Cluster, name: &str, script: &str, seconds: u32) -> f64 {
    crate::write::pgbench(cluster, name, script, CLIENTS, seconds, "-c synchronous_commit=off")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

pub fn inbox(seconds: u32) -> Vec<Row> {
    let cluster = Cluster::start(&crate::settings(&[("outbox.inbox_retention", "'1h'")]));
    cluster.wait_for_worker();
    let mut db = cluster.client();
    db.batch_execute(PLAIN).unwrap();
    // The runs claim for consumer 'bench'; the duplicates are ids of the form md5(n).
    let preclaim = format!(
        "TRUNCATE outbox.inbox, plain_inbox;
         INSERT INTO outbox.inbox (consumer, message_id) SELECT 'bench', md5(n::text)::uuid FROM generate_series(1, {CLAIMED}) n;
         INSERT INTO plain_inbox (consumer, message_id) SELECT 'bench', md5(n::text)::uuid FROM generate_series(1, {CLAIMED}) n;"
    );
    let variants = [
        ("new ids", "inbox_new", "SELECT outbox.inbox_claim(gen_random_uuid(), 'bench');\n"),
        (
            "new ids",
            "plain_new",
            "INSERT INTO plain_inbox (consumer, message_id) VALUES ('bench', gen_random_uuid()) ON CONFLICT DO NOTHING;\n",
        ),
        (
            "duplicates",
            "inbox_dup",
            "\\set n random(1, 100000)\nSELECT outbox.inbox_claim(md5(:n::text)::uuid, 'bench');\n",
        ),
        (
            "duplicates",
            "plain_dup",
            "\\set n random(1, 100000)\nINSERT INTO plain_inbox (consumer, message_id) VALUES ('bench', md5(:n::text)::uuid) ON CONFLICT DO NOTHING;\n",
        ),
    ];
    let mut tps: std::collections::HashMap<&str, Vec<f64>> = Default::default();
    for round in 1..=ROUNDS {
        for (_, name, script) in variants {
            db.batch_execute(&preclaim).unwrap();
            db.batch_execute("VACUUM ANALYZE outbox.inbox, plain_inbox").unwrap();
            db.batch_execute("CHECKPOINT").unwrap();
            let t = pgbench(&cluster, name, script, seconds);
            progress(&format!(
                "inbox, round {round}, {name}: {t:.0} claims/s ({CLIENTS} clients, {seconds} s)"
            ));
            tps.entry(name).or_default().push(t);
        }
    }
    let mean = |name: &str| tps[name].iter().sum::<f64>() / tps[name].len() as f64;
    let ratio =
        |inbox: &str, plain: &str| median(tps[inbox].iter().zip(&tps[plain]).map(|(i, p)| i / p).collect());

    // Clean-up: expired claims, removed by the worker (100 ms slices, one per round while it
    // has nothing to publish) against one DELETE of as many rows from the plain table.
    db.batch_execute(&format!(
        "TRUNCATE outbox.inbox, plain_inbox;
         INSERT INTO plain_inbox (consumer, message_id, claimed_at)
         SELECT 'old', gen_random_uuid(), now() - interval '2 hours' - n * interval '1 ms' FROM generate_series(1, {EXPIRED}) n;"
    ))
    .unwrap();
    db.batch_execute("VACUUM ANALYZE plain_inbox").unwrap();
    let started = Instant::now();
    let deleted =
        db.execute("DELETE FROM plain_inbox WHERE claimed_at < now() - interval '1 hour'", &[]).unwrap();
    let delete_rate = deleted as f64 / started.elapsed().as_secs_f64();
    let count = |db: &mut postgres::Client| -> i64 {
        db.query_one("SELECT count(*) FROM outbox.inbox", &[]).unwrap().get(0)
    };
    db.batch_execute(&format!(
        "INSERT INTO outbox.inbox (consumer, message_id, claimed_at)
         SELECT 'old', gen_random_uuid(), now() - interval '2 hours' - n * interval '1 ms' FROM generate_series(1, {EXPIRED}) n;"
    ))
    .unwrap();
    db.batch_execute("VACUUM ANALYZE outbox.inbox").unwrap();
    // A worker's first clean-up is at its first round (then every minute at this retention,
    // or at the next round while it is behind): restart the server for a new worker, and time
    // it from the first claim it removes to the last.
    cluster.restart();
    let mut db = cluster.client();
    wait_until(Duration::from_secs(600), "the worker to start removing expired claims", || {
        (count(&mut db) < EXPIRED).then_some(())
    });
    let started = Instant::now();
    wait_until(Duration::from_secs(600), "the worker to remove every expired claim", || {
        (count(&mut db) == 0).then_some(())
    });
    let worker_rate = EXPIRED as f64 / started.elapsed().as_secs_f64();
    progress(&format!(
        "inbox clean-up: worker {worker_rate:.0} claims/s, one DELETE {delete_rate:.0} rows/s"
    ));

    vec![
        Row {
            figure: "inbox: outbox.inbox_claim, new message ids (synchronous_commit off)".into(),
            value: format!("{:.0} claims/s", mean("inbox_new")),
            baseline: format!(
                "{:.0}/s, INSERT ... ON CONFLICT DO NOTHING into a plain table of the same shape",
                mean("plain_new")
            ),
            ratio: Some(ratio("inbox_new", "plain_new")),
            target: "reported".into(),
            met: None,
        },
        Row {
            figure: "inbox: outbox.inbox_claim, duplicates (false)".into(),
            value: format!("{:.0} claims/s", mean("inbox_dup")),
            baseline: format!("{:.0}/s, the same INSERT, conflicting", mean("plain_dup")),
            ratio: Some(ratio("inbox_dup", "plain_dup")),
            target: "reported".into(),
            met: None,
        },
        Row {
            figure: format!("inbox: the worker removing {EXPIRED} expired claims while idle"),
            value: format!("{worker_rate:.0} claims/s"),
            baseline: format!("{delete_rate:.0} rows/s, one DELETE of as many rows"),
            ratio: Some(worker_rate / delete_rate),
            target: "reported".into(),
            met: None,
        },
    ]
}
