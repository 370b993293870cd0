//! One server, several application databases: `outbox.database` lists them, the launcher runs
//! one worker per database, and each database's commands (DROP, RENAME, a copy) and limits
//! (templates, ALLOW_CONNECTIONS, background worker slots) are met without a restart loop.

use pg_outbox_tests::*;
use postgres::Client;
use std::collections::HashSet;
use std::time::{Duration, Instant};

const WITHIN: Duration = Duration::from_secs(60);

/// Publishes `n` events in `db` (each its own transaction); their message ids.
fn publish_in(cluster: &Cluster, db: &str, exchange: &str, n: usize, tag: &str) -> HashSet<String> {
    let mut c = cluster.connect(db);
    (0..n)
        .map(|i| {
            c.query_one(
                "SELECT outbox.publish('Tested', jsonb_build_object('db', $1::text, 'i', $2::int),
                                       exchange => $3, routing_key => $4)::text",
                &[&db, &(i as i32), &exchange, &tag],
            )
            .unwrap()
            .get(0)
        })
        .collect()
}

/// The worker of `db` as `pg_stat_activity` shows it: (pid, datname).
fn worker_of(cluster: &Cluster, db: &str) -> Option<i32> {
    cluster
        .connect("postgres")
        .query_opt(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_outbox worker' AND datname = $1",
            &[&db],
        )
        .unwrap()
        .map(|r| r.get(0))
}

fn stats(c: &mut Client) -> (Option<i32>, Option<String>, Option<String>, Option<i64>) {
    let r = c
        .query_one("SELECT worker_pid, worker_state, database, published_total FROM outbox.stats", &[])
        .unwrap();
    (r.get(0), r.get(1), r.get(2), r.get(3))
}

fn ids(deliveries: &[Delivery]) -> HashSet<String> {
    deliveries.iter().filter_map(|d| d.message_id.clone()).collect()
}

#[test]
fn each_listed_database_has_its_own_worker_and_reload_touches_only_what_changed() {
    let _alone = exclusive();
    let cluster = Cluster::init(&[("outbox.database", "'app, billing'")]);
    cluster.start_server();
    for db in ["app", "billing", "crm"] {
        cluster.admin().batch_execute(&format!("CREATE DATABASE {db}")).unwrap();
        cluster.connect(db).batch_execute("CREATE EXTENSION pg_outbox").unwrap();
    }
    let broker = Broker::connect();
    let exchange = broker.own_exchange();
    let consumer = broker.consume(&exchange, "#");
    let app = wait_until(WITHIN, "app's worker", || worker_of(&cluster, "app"));
    let billing = wait_until(WITHIN, "billing's worker", || worker_of(&cluster, "billing"));
    assert_ne!(app, billing);

    let sent_app = publish_in(&cluster, "app", &exchange, 5, "app");
    let sent_billing = publish_in(&cluster, "billing", &exchange, 7, "billing");
    let got = consumer.wait_for(12, WITHIN);
    assert_eq!(ids(&got), sent_app.union(&sent_billing).cloned().collect());
    // Each database's view shows its own worker and its own counts.
    for (db, pid, n) in [("app", app, 5), ("billing", billing, 7)] {
        let mut c = cluster.connect(db);
        let (shown_pid, state, database, _) = wait_until(WITHIN, "the counts", || {
            let s = stats(&mut c);
            (s.3 == Some(n)).then_some(s)
        });
        assert_eq!((shown_pid, database.as_deref()), (Some(pid), Some(db)), "{state:?}");
    }
    // A database that is not listed has no worker, and its events wait.
    let (pid, state, _, _) = stats(&mut cluster.connect("crm"));
    assert_eq!((pid, state.as_deref()), (None, Some("not running")));
    let sent_crm = publish_in(&cluster, "crm", &exchange, 3, "crm");

    // Adding crm starts its worker and leaves the others alone; its waiting events go out.
    cluster.reconfigure(&[("outbox.database", "'app, billing, crm'")]);
    wait_until(WITHIN, "crm's worker", || worker_of(&cluster, "crm"));
    let got = consumer.wait_for(15, WITHIN);
    assert!(sent_crm.is_subset(&ids(&got)));
    // Removing billing stops only its worker.
    cluster.reconfigure(&[("outbox.database", "'app,crm'")]);
    wait_until(WITHIN, "billing's worker to stop", || worker_of(&cluster, "billing").is_none().then_some(()));
    assert_eq!(worker_of(&cluster, "app"), Some(app), "app's worker was not restarted");
    let late = publish_in(&cluster, "billing", &exchange, 2, "billing");
    let more = publish_in(&cluster, "app", &exchange, 2, "app");
    let got = consumer.wait_for(17, WITHIN);
    assert!(more.is_subset(&ids(&got)));
    consumer.expect_no_more(17, Duration::from_secs(2));
    assert!(late.is_disjoint(&ids(&consumer.received())), "billing is no longer served");
    assert_eq!(cluster.log_count("no longer serving database \"billing\""), 1, "{}", cluster.log());

    // A bad list is refused when set, with its SQLSTATE, and nothing changes.
    let mut admin = cluster.admin();
    for bad in ["app,,crm", "app, app", "crm,"] {
        let e = admin.batch_execute(&format!("ALTER SYSTEM SET outbox.database = '{bad}'")).unwrap_err();
        assert_eq!(e.code(), Some(&postgres::error::SqlState::INVALID_PARAMETER_VALUE), "{bad}: {e}");
    }
    assert_eq!(cluster.log_count("terminated by signal"), 0, "{}", cluster.log());
}

#[test]
fn drop_and_rename_database_succeed_while_the_worker_runs_and_it_comes_back() {
    let _alone = exclusive();
    let cluster = Cluster::init(&[("outbox.database", "'app, other'")]);
    cluster.start_server();
    for db in ["app", "other"] {
        cluster.admin().batch_execute(&format!("CREATE DATABASE {db}")).unwrap();
        cluster.connect(db).batch_execute("CREATE EXTENSION pg_outbox").unwrap();
    }
    let broker = Broker::connect();
    let exchange = broker.own_exchange();
    let consumer = broker.consume(&exchange, "#");
    wait_until(WITHIN, "app's worker", || worker_of(&cluster, "app"));
    let other = wait_until(WITHIN, "other's worker", || worker_of(&cluster, "other"));
    // Work in flight in the database that goes.
    publish_in(&cluster, "app", &exchange, 20, "app");

    // Without FORCE: Postgres waits five seconds for other sessions, then fails. The worker
    // must have left by then.
    let mut admin = cluster.admin();
    let started = Instant::now();
    admin.batch_execute("DROP DATABASE app").expect("DROP DATABASE succeeds while the worker runs");
    eprintln!("DROP DATABASE took {:?}", started.elapsed());
    assert_eq!(worker_of(&cluster, "other"), Some(other), "the other database's worker stays");
    wait_until(WITHIN, "the launcher to wait for app", || {
        (cluster.log_count("waiting for database \"app\"") >= 1).then_some(())
    });

    // Created again: served again.
    admin.batch_execute("CREATE DATABASE app").unwrap();
    cluster.client().batch_execute("CREATE EXTENSION pg_outbox").unwrap();
    wait_until(WITHIN, "app's new worker", || worker_of(&cluster, "app"));
    let sent = publish_in(&cluster, "app", &exchange, 3, "app");
    let got = consumer.wait_for(23, WITHIN);
    assert!(sent.is_subset(&ids(&got)));

    // RENAME: succeeds; the renamed database is not served (the list names "app"); naming it
    // back serves it again.
    admin.batch_execute("ALTER DATABASE app RENAME TO app_renamed").expect("RENAME succeeds");
    assert_eq!(worker_of(&cluster, "app_renamed"), None);
    let waiting = publish_in(&cluster, "app_renamed", &exchange, 2, "app");
    admin.batch_execute("ALTER DATABASE app_renamed RENAME TO app").expect("and back");
    let got = consumer.wait_for(25, WITHIN);
    assert!(waiting.is_subset(&ids(&got)));

    // A copy of a served database (it is the template of CREATE DATABASE) works too.
    admin.batch_execute("CREATE DATABASE app_copy TEMPLATE app").expect("copying a served database");
    wait_until(WITHIN, "app's worker again", || worker_of(&cluster, "app"));
    assert_eq!(cluster.log_count("FATAL"), 0, "{}", cluster.log());
    assert_eq!(cluster.log_count("terminated by signal"), 0, "{}", cluster.log());
}

#[test]
fn templates_closed_databases_and_missing_worker_slots_are_said_once_without_a_restart_loop() {
    let _alone = exclusive();
    // The launcher and one worker fill the two slots.
    let cluster = Cluster::init(&[
        ("max_worker_processes", "2"),
        ("max_logical_replication_workers", "0"),
        ("max_parallel_workers", "0"),
    ]);
    cluster.start_server();
    let mut admin = cluster.admin();
    for db in ["app", "closed", "spare"] {
        admin.batch_execute(&format!("CREATE DATABASE {db}")).unwrap();
        cluster.connect(db).batch_execute("CREATE EXTENSION pg_outbox").unwrap();
    }
    admin.batch_execute("ALTER DATABASE closed ALLOW_CONNECTIONS false").unwrap();
    // After the others were copied from it: its own view, to read.
    cluster.connect("template1").batch_execute("CREATE EXTENSION pg_outbox").unwrap();
    wait_until(WITHIN, "app's worker", || worker_of(&cluster, "app"));
    cluster.reconfigure(&[("outbox.database", "'app, template1, closed, spare'")]);
    wait_until(WITHIN, "the slot warning", || {
        (cluster.log_count("no background worker slot is free") >= 1).then_some(())
    });
    // Give the launcher time to try again many times (it looks every second).
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        cluster.log_count("not serving database \"template1\": it is a template"),
        1,
        "{}",
        cluster.log()
    );
    assert_eq!(cluster.log_count("not serving database \"closed\": it does not allow connections"), 1);
    assert_eq!(cluster.log_count("FATAL"), 0, "{}", cluster.log());
    let workers: i64 = admin
        .query_one("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'pg_outbox worker'", &[])
        .unwrap()
        .get(0);
    assert_eq!(workers, 1, "one slot, one worker");
    // The database whose worker could not start says why in its own view, once in the log.
    let (pid, state, _, _) = stats(&mut cluster.connect("spare"));
    assert_eq!(pid, None);
    assert_eq!(state.as_deref(), Some("waiting for a background worker slot (max_worker_processes)"));
    assert_eq!(cluster.log_count("no background worker slot is free"), 1, "{}", cluster.log());
    assert_eq!(cluster.log_count("stopped after"), 0, "no worker was started only to fail");
    let (_, state, _, _) = stats(&mut cluster.connect("template1"));
    assert_eq!(state.as_deref(), Some("not served: it is a template database"));
}
