//! Upgrades: an outbox created at a released version, holding events, updated in place with
//! `ALTER EXTENSION pg_outbox UPDATE`, is the same as a fresh install and loses nothing.

use pg_outbox_tests::*;
use std::collections::HashSet;
use std::time::Duration;

const WITHIN: Duration = Duration::from_secs(90);

/// Everything the schema `outbox` holds, as the catalogs define it: relations with their
/// privileges and comments, columns with types, defaults and identity, indexes, constraints,
/// functions and procedures with their definitions and privileges.
fn schema_of(cluster: &Cluster, db: &str) -> Vec<String> {
    cluster
        .connect(db)
        .query(
            "SELECT format('relation %s %s acl=%s comment=%s', c.relname, c.relkind, c.relacl, obj_description(c.oid))
               FROM pg_class c WHERE c.relnamespace = 'outbox'::regnamespace
             UNION ALL
             SELECT format('column %s.%s %s notnull=%s identity=%s default=%s', c.relname, a.attname,
                           format_type(a.atttypid, a.atttypmod), a.attnotnull, a.attidentity,
                           pg_get_expr(d.adbin, d.adrelid))
               FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
               LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
              WHERE c.relnamespace = 'outbox'::regnamespace AND a.attnum > 0 AND NOT a.attisdropped
             UNION ALL
             SELECT 'index ' || pg_get_indexdef(i.indexrelid)
               FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid WHERE c.relnamespace = 'outbox'::regnamespace
             UNION ALL
             SELECT format('constraint %s %s', conname, pg_get_constraintdef(oid))
               FROM pg_constraint WHERE connamespace = 'outbox'::regnamespace
             UNION ALL
             SELECT format('function %s acl=%s comment=%s', pg_get_functiondef(p.oid), p.proacl, obj_description(p.oid))
               FROM pg_proc p WHERE p.pronamespace = 'outbox'::regnamespace
             ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// What CREATE EXTENSION marks for pg_dump and the extension's members, as SQL sees them.
fn catalog_of(cluster: &Cluster, db: &str) -> Vec<String> {
    cluster
        .connect(db)
        .query(
            "SELECT pg_describe_object(classid, objid, objsubid) FROM pg_depend
              WHERE refclassid = 'pg_extension'::regclass AND deptype = 'e'
                AND refobjid = (SELECT oid FROM pg_extension WHERE extname = 'pg_outbox')
             UNION ALL
             SELECT 'dumped: ' || c::regclass::text
               FROM pg_extension e, unnest(e.extconfig) c WHERE e.extname = 'pg_outbox'
             ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[test]
fn an_outbox_of_0_1_0_updated_in_place_is_a_fresh_one_and_loses_nothing() {
    let _alone = exclusive();
    let broker = Broker::connect();
    let exchange = broker.own_exchange();
    let cluster = Cluster::init(&[]);
    cluster.start_server();
    let mut admin = cluster.admin();
    admin.batch_execute("CREATE DATABASE fresh").unwrap();
    cluster.connect("fresh").batch_execute("CREATE EXTENSION pg_outbox").unwrap();
    admin.batch_execute(&format!("CREATE DATABASE {DB}")).unwrap();
    let consumer = broker.consume(&exchange, "#");
    let mut db = cluster.client();
    // The 0.1.0 schema, with events written by it, waiting (the worker waits for the update).
    db.batch_execute("CREATE EXTENSION pg_outbox VERSION '0.1.0'").unwrap();
    let ids: HashSet<String> = db
        .query(
            "SELECT outbox.publish('Old', jsonb_build_object('n', n), aggregate_id => (n % 3)::text, exchange => $1)::text
               FROM generate_series(1, 20) n",
            &[&exchange.name],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    wait_until(WITHIN, "the worker to wait for the update", || {
        (cluster.log_count("run ALTER EXTENSION pg_outbox UPDATE") > 0).then_some(())
    });
    assert_eq!(consumer.count(), 0, "nothing published before the update");

    db.batch_execute("ALTER EXTENSION pg_outbox UPDATE").unwrap();
    let version: String =
        db.query_one("SELECT extversion FROM pg_extension WHERE extname = 'pg_outbox'", &[]).unwrap().get(0);
    assert_eq!(version, "0.2.0");
    let got = consumer.wait_for(20, WITHIN);
    assert_eq!(got.iter().filter_map(|d| d.message_id.clone()).collect::<HashSet<_>>(), ids);
    cluster.wait_drained(WITHIN);

    assert_eq!(
        schema_of(&cluster, DB),
        schema_of(&cluster, "fresh"),
        "updated schema differs from a fresh one"
    );
    assert_eq!(catalog_of(&cluster, DB), catalog_of(&cluster, "fresh"));
}
