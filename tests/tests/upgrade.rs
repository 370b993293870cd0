//! Upgrades: the released 0.1.0, built from its commit and running with events pending and dead
//! letters, updated the way an operator does it (new library, restart, `ALTER EXTENSION
//! pg_outbox UPDATE`) publishes every pending event once and in order, keeps its dead letters,
//! and ends with the same schema as a fresh install of the new version.
//!
//! The old build runs from a private copy of the Postgres installation, so the library every
//! other test loads is never replaced. The old build comes from `$OUTBOX_RELEASE_0_1_0` (a
//! package directory) or else from `script/release-build`, which builds it once per machine.

use pg_outbox_tests::install::{pg_config, PgDirs, PrivateInstall};
use pg_outbox_tests::*;
use postgres::Client;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

const WITHIN: Duration = Duration::from_secs(90);

/// The release 0.1.0: its commit on main.
const RELEASE_0_1_0: &str = "7b4290a";

/// The version this build installs: the extension crate's (the repository's `Cargo.toml`).
fn current() -> String {
    let manifest = std::fs::read_to_string(repo().join("Cargo.toml")).unwrap();
    let line = manifest.lines().find(|l| l.starts_with("version = ")).expect("a version in Cargo.toml");
    line.trim_start_matches("version = ").trim_matches('"').to_string()
}

/// What the new worker logs while the extension is still at the old version.
const WAITS_FOR_UPDATE: &str = "run ALTER EXTENSION pg_outbox UPDATE";

/// The package of 0.1.0 (a staging tree of `cargo pgrx package`): `$OUTBOX_RELEASE_0_1_0`, or
/// built from its commit by `script/release-build` (minutes the first time on a machine).
fn release_0_1_0(pg_config: &Path) -> PathBuf {
    if let Some(dir) = std::env::var_os("OUTBOX_RELEASE_0_1_0") {
        return dir.into();
    }
    eprintln!("building 0.1.0 with script/release-build (set OUTBOX_RELEASE_0_1_0 to skip)");
    let started = Instant::now();
    let out = repo_script("release-build")
        .arg(RELEASE_0_1_0)
        .arg(pg_config)
        .stderr(Stdio::inherit())
        .output()
        .expect("run script/release-build");
    assert!(out.status.success(), "script/release-build {RELEASE_0_1_0} failed");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let dir = stdout.lines().last().expect("script/release-build printed its output directory");
    eprintln!("0.1.0 package: {dir} ({:?})", started.elapsed());
    dir.into()
}

fn extversion(db: &mut Client) -> String {
    db.query_one("SELECT extversion FROM pg_extension WHERE extname = 'pg_outbox'", &[]).unwrap().get(0)
}

/// Every dead letter, whole, in id order.
fn dead_letters(db: &mut Client) -> Vec<(i64, String, String)> {
    db.query("SELECT id, message_id::text, to_jsonb(d)::text FROM outbox.dead_letters d ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// One event of `aggregate`, numbered `seq`, in a transaction of its own; its message id.
fn write_event(db: &mut Client, exchange: &str, aggregate: &str, seq: i32) -> String {
    db.query_one(
        "SELECT outbox.publish('Pending', jsonb_build_object('aggregate', $1::text, 'seq', $2::int),
                               aggregate_type => 'order', aggregate_id => $1, exchange => $3)::text",
        &[&aggregate, &seq, &exchange],
    )
    .unwrap()
    .get(0)
}

/// The extension as the catalogs define it, one line per fact, sorted: every member object;
/// relations with kind, owner, privileges, options, row security and comment; columns in
/// order with type, default, not-null, identity, generated expression, collation, storage,
/// privileges and comment; indexes, constraints, view definitions, rules, triggers, policies,
/// statistics objects; sequences with type, bounds, increment, cache, cycle and owning
/// column; functions and procedures with their full definition (`pg_get_functiondef`: SECURITY
/// DEFINER, SET clauses, body) and, explicitly, kind, owner, privileges, security, settings,
/// volatility, parallel safety, leakproofness, strictness, cost and rows; types and enum
/// labels; the schema's owner, privileges and comment; default privileges; the privileges
/// pg_dump takes as the extension's own (`pg_init_privs`); the extension's owner, schema,
/// version, and what pg_dump dumps of it (`extconfig`/`extcondition`). No line holds an OID or a
/// database name: objects are named (toast tables only counted), so two databases compare.
const CATALOG: &str = r#"
WITH ext AS (SELECT e.* FROM pg_extension e WHERE e.extname = 'pg_outbox'),
members AS (
    SELECT d.classid, d.objid, d.objsubid
      FROM pg_depend d, ext
     WHERE d.refclassid = 'pg_extension'::regclass AND d.refobjid = ext.oid AND d.deptype = 'e'),
nsp AS (
    SELECT extnamespace AS oid FROM ext
    UNION SELECT objid FROM members WHERE classid = 'pg_namespace'::regclass),
rels AS (
    SELECT c.* FROM pg_class c
     WHERE c.relnamespace IN (SELECT oid FROM nsp)
        OR c.oid IN (SELECT objid FROM members WHERE classid = 'pg_class'::regclass)),
procs AS (
    SELECT p.* FROM pg_proc p
     WHERE p.pronamespace IN (SELECT oid FROM nsp)
        OR p.oid IN (SELECT objid FROM members WHERE classid = 'pg_proc'::regclass)),
types AS (
    SELECT t.* FROM pg_type t
     WHERE t.typnamespace IN (SELECT oid FROM nsp)
        OR t.oid IN (SELECT objid FROM members WHERE classid = 'pg_type'::regclass))
SELECT line FROM (
    SELECT 'member ' || pg_describe_object(classid, objid, objsubid) FROM members
UNION ALL
    SELECT format('extension owner=%s schema=%s relocatable=%s version=%s',
                  extowner::regrole, extnamespace::regnamespace, extrelocatable, extversion)
      FROM ext
UNION ALL
    SELECT format('dumped %s where %L', cfg::regclass, cond)
      FROM ext, unnest(ext.extconfig, ext.extcondition) AS u(cfg, cond)
UNION ALL
    SELECT format('schema %s owner=%s acl=%s comment=%s',
                  n.nspname, n.nspowner::regrole, n.nspacl, obj_description(n.oid, 'pg_namespace'))
      FROM pg_namespace n WHERE n.oid IN (SELECT oid FROM nsp)
UNION ALL
    SELECT format('default privileges of %s in %s on %s: %s',
                  a.defaclrole::regrole, a.defaclnamespace::regnamespace, a.defaclobjtype, a.defaclacl)
      FROM pg_default_acl a
UNION ALL
    SELECT format('initial privileges (%s) of %s: %s',
                  i.privtype, pg_describe_object(i.classoid, i.objoid, i.objsubid), i.initprivs)
      FROM pg_init_privs i WHERE i.privtype = 'e'
UNION ALL
    SELECT format('relation %s kind=%s persistence=%s am=%s owner=%s acl=%s options=%s of=%s partkey=%s rls=%s forcerls=%s replident=%s toast=%s comment=%s',
                  c.oid::regclass, c.relkind, c.relpersistence, am.amname, c.relowner::regrole, c.relacl,
                  c.reloptions, c.reloftype::regtype, pg_get_partkeydef(c.oid), c.relrowsecurity,
                  c.relforcerowsecurity, c.relreplident, c.reltoastrelid <> 0, obj_description(c.oid, 'pg_class'))
      FROM rels c LEFT JOIN pg_am am ON am.oid = c.relam
UNION ALL
    SELECT format('column %s #%s %s %s notnull=%s default=%s identity=%s generated=%s collation=%s storage=%s compression=%s acl=%s comment=%s',
                  c.oid::regclass, row_number() OVER (PARTITION BY a.attrelid ORDER BY a.attnum), a.attname,
                  format_type(a.atttypid, a.atttypmod), a.attnotnull, pg_get_expr(d.adbin, d.adrelid),
                  a.attidentity, a.attgenerated, co.collname, a.attstorage, a.attcompression, a.attacl,
                  col_description(a.attrelid, a.attnum))
      FROM pg_attribute a JOIN rels c ON c.oid = a.attrelid
      LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
      LEFT JOIN pg_collation co ON co.oid = a.attcollation
     WHERE a.attnum > 0 AND NOT a.attisdropped
UNION ALL
    SELECT format('index %s primary=%s exclusion=%s immediate=%s clustered=%s valid=%s replident=%s',
                  pg_get_indexdef(i.indexrelid), i.indisprimary, i.indisexclusion, i.indimmediate,
                  i.indisclustered, i.indisvalid, i.indisreplident)
      FROM pg_index i JOIN rels c ON c.oid = i.indrelid
UNION ALL
    SELECT format('constraint %s on %s domain %s type=%s deferrable=%s deferred=%s validated=%s noinherit=%s: %s',
                  con.conname, con.conrelid::regclass, con.contypid::regtype, con.contype, con.condeferrable,
                  con.condeferred, con.convalidated, con.connoinherit, pg_get_constraintdef(con.oid))
      FROM pg_constraint con
     WHERE con.connamespace IN (SELECT oid FROM nsp) OR con.conrelid IN (SELECT oid FROM rels)
UNION ALL
    SELECT format('view %s: %s', c.oid::regclass, pg_get_viewdef(c.oid, true))
      FROM rels c WHERE c.relkind IN ('v', 'm')
UNION ALL
    SELECT format('rule enabled=%s %s', r.ev_enabled, pg_get_ruledef(r.oid, true))
      FROM pg_rewrite r JOIN rels c ON c.oid = r.ev_class WHERE r.rulename <> '_RETURN'
UNION ALL
    SELECT format('trigger enabled=%s %s', t.tgenabled, pg_get_triggerdef(t.oid, true))
      FROM pg_trigger t JOIN rels c ON c.oid = t.tgrelid WHERE NOT t.tgisinternal
UNION ALL
    SELECT format('policy %s on %s command=%s permissive=%s roles=%s using=%s check=%s',
                  p.polname, p.polrelid::regclass, p.polcmd, p.polpermissive, p.polroles::regrole[],
                  pg_get_expr(p.polqual, p.polrelid), pg_get_expr(p.polwithcheck, p.polrelid))
      FROM pg_policy p JOIN rels c ON c.oid = p.polrelid
UNION ALL
    SELECT 'statistics ' || pg_get_statisticsobjdef(s.oid)
      FROM pg_statistic_ext s WHERE s.stxnamespace IN (SELECT oid FROM nsp)
UNION ALL
    SELECT format('sequence %s type=%s start=%s increment=%s min=%s max=%s cache=%s cycle=%s owned by %s',
                  s.seqrelid::regclass, s.seqtypid::regtype, s.seqstart, s.seqincrement, s.seqmin, s.seqmax,
                  s.seqcache, s.seqcycle,
                  (SELECT string_agg(pg_describe_object(d.refclassid, d.refobjid, d.refobjsubid)
                                     || ' (' || d.deptype::text || ')', ', ')
                     FROM pg_depend d
                    WHERE d.classid = 'pg_class'::regclass AND d.objid = s.seqrelid AND d.deptype IN ('a', 'i')))
      FROM pg_sequence s JOIN rels c ON c.oid = s.seqrelid
UNION ALL
    SELECT format(E'routine %s kind=%s owner=%s acl=%s security_definer=%s config=%s volatile=%s parallel=%s leakproof=%s strict=%s returns_set=%s cost=%s rows=%s language=%s comment=%s\n%s',
                  p.oid::regprocedure, p.prokind, p.proowner::regrole, p.proacl, p.prosecdef, p.proconfig,
                  p.provolatile, p.proparallel, p.proleakproof, p.proisstrict, p.proretset, p.procost,
                  p.prorows, l.lanname, obj_description(p.oid, 'pg_proc'),
                  CASE WHEN p.prokind = 'a' THEN 'aggregate' ELSE pg_get_functiondef(p.oid) END)
      FROM procs p JOIN pg_language l ON l.oid = p.prolang
UNION ALL
    SELECT format('type %s type=%s category=%s owner=%s acl=%s notnull=%s default=%s base=%s relation=%s element=%s collation=%s comment=%s',
                  t.oid::regtype, t.typtype, t.typcategory, t.typowner::regrole, t.typacl, t.typnotnull,
                  t.typdefault, t.typbasetype::regtype, t.typrelid::regclass, t.typelem::regtype,
                  (SELECT collname FROM pg_collation WHERE oid = t.typcollation), obj_description(t.oid, 'pg_type'))
      FROM types t
UNION ALL
    SELECT format('enum %s #%s %s', e.enumtypid::regtype,
                  row_number() OVER (PARTITION BY e.enumtypid ORDER BY e.enumsortorder), e.enumlabel)
      FROM pg_enum e JOIN types t ON t.oid = e.enumtypid
) facts(line)
ORDER BY line
"#;

fn catalog_of(cluster: &Cluster, db: &str) -> Vec<String> {
    let lines: Vec<String> =
        cluster.connect(db).query(CATALOG, &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert!(lines.iter().any(|l| l.starts_with("member ")), "database {db} has no pg_outbox");
    lines
}

/// Panics with the lines only one side has.
fn assert_same_catalog(updated: &[String], fresh: &[String]) {
    if updated == fresh {
        return;
    }
    let (a, b): (BTreeSet<&String>, BTreeSet<&String>) = (updated.iter().collect(), fresh.iter().collect());
    let only = |x: &BTreeSet<&String>, y: &BTreeSet<&String>| {
        x.difference(y).map(|l| format!("  {l}\n")).collect::<String>()
    };
    panic!(
        "the updated extension differs from a fresh install\nonly after the update:\n{}only in a fresh install:\n{}",
        only(&a, &b),
        only(&b, &a)
    );
}

#[test]
fn release_0_1_0_with_pending_events_and_dead_letters_updated_in_place_publishes_them_in_order_and_equals_a_fresh_install(
) {
    let _alone = exclusive();
    let pg_config = pg_config();
    let package = release_0_1_0(&pg_config);
    let old = PgDirs::of(&pg_config).under(&package);
    assert_eq!(
        std::fs::read_to_string(old.share_ext().join("pg_outbox--0.1.0.sql")).unwrap(),
        std::fs::read_to_string(repo().join("sql/archive/pg_outbox--0.1.0.sql")).unwrap(),
        "sql/archive/pg_outbox--0.1.0.sql is not the install script 0.1.0 generates"
    );

    // Dropped last: the cluster (declared after it) stops before its programs go.
    let install = PrivateInstall::copy_of(&pg_config);
    install.remove_extension("pg_outbox");
    install.add_extension("pg_outbox", &old.pkglib, &old.share_ext());

    let broker = Broker::connect();
    let exchange = broker.own_exchange();
    let consumer = broker.consume(&exchange, "#");
    // No queue is bound to it (until the replay): what goes there is unroutable, a failure.
    let unroutable = broker.own_exchange();

    let cluster = Cluster::init_with_bin(&install.bin, &quick_retries("2"));
    cluster.start_server();
    cluster.admin().batch_execute(&format!("CREATE DATABASE {DB}")).unwrap();
    let mut db = cluster.client();
    db.batch_execute("CREATE EXTENSION pg_outbox").unwrap();
    assert_eq!(extversion(&mut db), "0.1.0");

    // The 0.1.0 worker publishes.
    let first = write_event(&mut db, &exchange, "first", 1);
    let got = consumer.wait_for(1, WITHIN);
    assert_eq!(got[0].message_id.as_deref(), Some(first.as_str()), "0.1.0 published the event");

    // Dead letters: unroutable twice (outbox.max_attempts = 2), with everything a row holds.
    db.execute(
        "SELECT outbox.publish('Lost', jsonb_build_object('n', n), aggregate_type => 'lost',
                               aggregate_id => n::text, headers => jsonb_build_object('h', n),
                               routing_key => 'lost.' || n, exchange => $1)
           FROM generate_series(1, 3) n",
        &[&unroutable.name],
    )
    .unwrap();
    wait_until(WITHIN, "0.1.0 to dead-letter 3 events", || {
        (dead_letters(&mut db).len() == 3 && cluster.pending() == 0).then_some(())
    });
    let dead = dead_letters(&mut db);

    // Pending: the worker has no broker while 3 aggregates get 20 events each, interleaved.
    cluster.cut_off_broker();
    let mut written: Vec<String> = Vec::new();
    for seq in 1..=20 {
        for aggregate in ["a", "b", "c"] {
            written.push(write_event(&mut db, &exchange, aggregate, seq));
        }
    }
    assert_eq!(cluster.pending(), 60);
    drop(db);
    cluster.stop();

    // The new version's package, as installed for the system (script/setup), replaces the old;
    // the broker is back.
    install.remove_extension("pg_outbox");
    install.add_extension_from("pg_outbox", &pg_config);
    for script in
        ["pg_outbox--0.1.0--0.2.0.sql", "pg_outbox--0.2.0--0.3.0.sql", "pg_outbox--0.3.0--0.4.0.sql"]
    {
        assert_eq!(
            std::fs::read_to_string(install.share_ext.join(script)).ok(),
            std::fs::read_to_string(repo().join("sql").join(script)).ok(),
            "the installed upgrade script is not sql/{script}: run script/setup"
        );
    }
    cluster.reconfigure_file(&[("outbox.amqp_url", BROKER_URL)]);
    let waits = cluster.log_count(WAITS_FOR_UPDATE);
    cluster.start_server();
    let mut db = cluster.client();

    // Until the update the new worker waits, publishing nothing; the old schema, now served by
    // the new library, still answers and takes events.
    wait_until(WITHIN, "the new worker to ask for the update", || {
        (cluster.log_count(WAITS_FOR_UPDATE) > waits).then_some(())
    });
    // The worker logs first, then shows its state.
    wait_until(WITHIN, "outbox.stats to say the worker waits for the update", || {
        let state: String = db.query_one("SELECT worker_state FROM outbox.stats", &[]).unwrap().get(0);
        (state == "waiting for extension update").then_some(())
    });
    written.push(write_event(&mut db, &exchange, "a", 21));
    assert_eq!(extversion(&mut db), "0.1.0");
    assert_eq!(cluster.pending(), 61);
    assert_eq!(consumer.count(), 1, "published before ALTER EXTENSION pg_outbox UPDATE");

    db.batch_execute("ALTER EXTENSION pg_outbox UPDATE").unwrap();
    assert_eq!(extversion(&mut db), current());
    cluster.wait_drained(WITHIN);
    // Everything is confirmed, so in the queue; an event published now arrives after all of it.
    let last = write_event(&mut db, &exchange, "last", 1);
    let got = wait_until(WITHIN, "the last event", || {
        let got = consumer.received();
        got.iter().any(|d| d.message_id.as_deref() == Some(last.as_str())).then_some(got)
    });
    assert_eq!(got.last().unwrap().message_id.as_deref(), Some(last.as_str()), "the last event came last");
    let got = &got[1..got.len() - 1];
    assert_eq!(got.len(), written.len(), "every pending event published once, nothing else");
    let mut ids: Vec<&str> = got.iter().map(|d| d.message_id.as_deref().expect("a message id")).collect();
    ids.sort_unstable();
    let mut expected: Vec<&str> = written.iter().map(String::as_str).collect();
    expected.sort_unstable();
    assert_eq!(ids, expected, "the pending events' message ids, each once");
    let mut order: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for d in got {
        let body = d.json();
        assert_eq!(d.header("aggregate_id"), body["aggregate"].as_str());
        order
            .entry(body["aggregate"].as_str().unwrap().into())
            .or_default()
            .push(body["seq"].as_i64().unwrap());
    }
    for (aggregate, seqs) in &order {
        let n = if aggregate == "a" { 21 } else { 20 };
        assert_eq!(
            seqs,
            &(1..=n).collect::<Vec<i64>>(),
            "aggregate {aggregate} published in the order written"
        );
    }

    // The dead letters came through whole, and a replay publishes one.
    assert_eq!(dead_letters(&mut db), dead, "dead letters after the update");
    let replayed = broker.consume(&unroutable, "#");
    let n: i64 =
        db.query_one("SELECT outbox.replay_dead_letters(ARRAY[$1::bigint])", &[&dead[0].0]).unwrap().get(0);
    assert_eq!(n, 1);
    let got = replayed.wait_for(1, WITHIN);
    assert_eq!(got[0].message_id.as_deref(), Some(dead[0].1.as_str()), "the replayed dead letter");
    let row: serde_json::Value = serde_json::from_str(&dead[0].2).unwrap();
    assert_eq!(Some(got[0].routing_key.as_str()), row["routing_key"].as_str());
    assert_eq!(got[0].json(), row["payload"]);
    assert_eq!(got[0].header("aggregate_id"), row["aggregate_id"].as_str());
    cluster.wait_drained(WITHIN);
    assert_eq!(dead_letters(&mut db), dead[1..]);

    // The same extension as a fresh install, object for object.
    cluster.admin().batch_execute("CREATE DATABASE fresh").unwrap();
    cluster.connect("fresh").batch_execute("CREATE EXTENSION pg_outbox").unwrap();
    assert_eq!(extversion(&mut cluster.connect("fresh")), current());
    assert_same_catalog(&catalog_of(&cluster, DB), &catalog_of(&cluster, "fresh"));
}

/// An archived release, created from its install script with this build's library: the worker waits
/// for the update; the update publishes what waited, and ends with a fresh install's schema.
fn archived_release_updated_in_place(version: &str) {
    assert_eq!(
        std::fs::read_to_string(PgDirs::of(&pg_config()).share_ext().join(format!("pg_outbox--{version}.sql"))).ok(),
        std::fs::read_to_string(repo().join(format!("sql/archive/pg_outbox--{version}.sql"))).ok(),
        "the installed install script of {version} is not sql/archive/pg_outbox--{version}.sql: run script/setup"
    );
    let cluster = Cluster::start(&[]);
    let broker = Broker::connect();
    let exchange = broker.own_exchange();
    let consumer = broker.consume(&exchange, "#");
    let mut db = cluster.client();
    let waits = cluster.log_count(WAITS_FOR_UPDATE);
    db.batch_execute(&format!("DROP EXTENSION pg_outbox; CREATE EXTENSION pg_outbox VERSION '{version}'"))
        .unwrap();
    assert_eq!(extversion(&mut db), version);
    wait_until(WITHIN, "the worker to ask for the update", || {
        (cluster.log_count(WAITS_FOR_UPDATE) > waits).then_some(())
    });
    let written: Vec<String> = (1..=5).map(|seq| write_event(&mut db, &exchange, "a", seq)).collect();
    consumer.expect_no_more(0, Duration::from_secs(2));
    db.batch_execute("ALTER EXTENSION pg_outbox UPDATE").unwrap();
    assert_eq!(extversion(&mut db), current());
    let got = consumer.wait_for(5, WITHIN);
    let ids: Vec<&str> = got.iter().map(|d| d.message_id.as_deref().unwrap()).collect();
    assert_eq!(ids, written.iter().map(String::as_str).collect::<Vec<_>>(), "once each, in order");
    // What 0.3.0 and 0.4.0 added works after the update.
    db.query_one("SELECT outbox.metrics_text(), outbox.inbox_claim(gen_random_uuid())", &[]).unwrap();
    db.query_one("SELECT count(stream_seq) FROM outbox.messages, outbox.stream_producers", &[]).unwrap();
    cluster.admin().batch_execute("CREATE DATABASE fresh").unwrap();
    cluster.connect("fresh").batch_execute("CREATE EXTENSION pg_outbox").unwrap();
    assert_same_catalog(&catalog_of(&cluster, DB), &catalog_of(&cluster, "fresh"));
}

#[test]
fn release_0_2_0_updated_in_place_publishes_what_waited_and_equals_a_fresh_install() {
    archived_release_updated_in_place("0.2.0");
}

#[test]
fn release_0_3_0_updated_in_place_publishes_what_waited_and_equals_a_fresh_install() {
    archived_release_updated_in_place("0.3.0");
}
