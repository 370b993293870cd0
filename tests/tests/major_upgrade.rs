//! Moving to a new major version of PostgreSQL with pg_upgrade, events pending: nothing is
//! published (or touched) while pg_upgrade runs either server in binary-upgrade mode, and the
//! upgraded cluster publishes every pending event, in order, when it starts.
//!
//! Needs two installations with pg_outbox installed: the new one is `$PG_CONFIG`'s, the old one
//! `$OUTBOX_UPGRADE_FROM` (a pg_config). `script/test` runs it from PostgreSQL 16 to 18.

use pg_outbox_tests::install::PgDirs;
use pg_outbox_tests::*;
use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

const WITHIN: Duration = Duration::from_secs(90);
const AGGREGATES: [&str; 3] = ["a", "b", "c"];
const PER_AGGREGATE: i32 = 10;

fn version(bin: &std::path::Path) -> String {
    let out = std::process::Command::new(bin.join("postgres")).arg("--version").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn pending_events_cross_pg_upgrade_and_nothing_runs_during_it() {
    let Some(from) = std::env::var_os("OUTBOX_UPGRADE_FROM") else {
        println!("skipped: set OUTBOX_UPGRADE_FROM to the pg_config of the PostgreSQL to upgrade from");
        return;
    };
    let old_bin = PgDirs::of(&PathBuf::from(from)).bin;
    let new_bin = cluster::pg_bin().to_path_buf();
    println!("pg_upgrade from {} to {}", version(&old_bin), version(&new_bin));
    let _alone = exclusive();
    let broker = Broker::connect();
    let exchange = broker.own_exchange();
    let consumer = broker.consume(&exchange, "#");

    // The old cluster, with data checksums as the new one has them by default (18), cannot
    // reach the broker: its events wait.
    let unreachable = unreachable_broker_url();
    let old = Cluster::init_with(&old_bin, &["--data-checksums"], &[("outbox.amqp_url", &unreachable)]);
    old.start_server();
    old.admin().batch_execute(&format!("CREATE DATABASE {DB}")).unwrap();
    let mut db = old.client();
    db.batch_execute("CREATE EXTENSION pg_outbox").unwrap();
    let mut ids = HashSet::new();
    for n in 1..=PER_AGGREGATE {
        for aggregate in AGGREGATES {
            let id: String = db
                .query_one(
                    "SELECT outbox.publish('Moved', jsonb_build_object('n', $1::int), aggregate_id => $2, exchange => $3)::text",
                    &[&n, &aggregate, &exchange.name],
                )
                .unwrap()
                .get(0);
            ids.insert(id);
        }
    }
    assert_eq!(old.pending(), ids.len() as i64);
    let extversion = |db: &mut postgres::Client| -> String {
        db.query_one("SELECT extversion FROM pg_extension WHERE extname = 'pg_outbox'", &[]).unwrap().get(0)
    };
    let old_version = extversion(&mut db);
    drop(db);
    old.stop();
    // From now on the old cluster's settings name the real broker: a worker started by
    // pg_upgrade (which starts the old server to dump it) would publish and delete the events.
    old.reconfigure_file(&[("outbox.amqp_url", BROKER_URL)]);

    // The new cluster: pg_outbox preloaded and pointed at the real broker too.
    let new = Cluster::init_with_bin(&new_bin, &[]);
    let output = new
        .command("pg_upgrade")
        .current_dir(&new.dir)
        .args(["--old-bindir", old_bin.to_str().unwrap(), "--new-bindir", new_bin.to_str().unwrap()])
        .args(["--old-datadir", old.data().to_str().unwrap(), "--new-datadir", new.data().to_str().unwrap()])
        .args([
            "--old-port",
            &cluster::free_port().to_string(),
            "--new-port",
            &cluster::free_port().to_string(),
        ])
        .args(["--socketdir", new.dir.to_str().unwrap(), "--username", "postgres", "--retain"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "pg_upgrade failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    // pg_upgrade's logs of both servers (kept with --retain): no pg_outbox process started.
    let logs: String = walk(&new.data().join("pg_upgrade_output.d"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .map(|p| std::fs::read_to_string(p).unwrap_or_default())
        .collect();
    assert!(logs.contains("pg_ctl"), "pg_upgrade's logs were read");
    assert!(!logs.contains("pg_outbox:"), "{logs}");
    assert_eq!(consumer.count(), 0, "nothing published during pg_upgrade");

    // The upgraded cluster publishes everything that waited, per aggregate in order.
    new.start_server();
    let got = consumer.wait_for(ids.len(), WITHIN);
    let received: HashSet<String> = got.iter().filter_map(|d| d.message_id.clone()).collect();
    assert_eq!(received, ids);
    let mut order: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for d in &got {
        order
            .entry(d.header("aggregate_id").unwrap().to_string())
            .or_default()
            .push(d.json()["n"].as_i64().unwrap());
    }
    for aggregate in AGGREGATES {
        assert_eq!(order[aggregate], (1..=PER_AGGREGATE as i64).collect::<Vec<_>>(), "order of {aggregate}");
    }
    new.wait_drained(WITHIN);
    assert_eq!(extversion(&mut new.client()), old_version);
}

fn walk(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}
