//! pg_outbox is a guest in every database of the cluster: these tests try, with a real second
//! role and real sessions, to make it change what others see or to turn it against its host.

use pg_outbox_tests::*;
use postgres::Client;
use std::collections::HashSet;
use std::time::Duration;

const WITHIN: Duration = Duration::from_secs(90);

/// A session in `app` as the superuser, whatever the database's own settings say, and with a
/// `search_path` that finds nothing a tenant planted.
fn admin_in_app(cluster: &Cluster) -> Client {
    let mut c = cluster.client();
    c.batch_execute(
        "SET ROLE NONE; SET search_path = pg_catalog, pg_temp; SET default_transaction_read_only = off;
         SET statement_timeout = 0; SET lock_timeout = 0",
    )
    .unwrap();
    c
}

/// The tenant's objects in `public`: every one of them records who ran it and, run by a
/// superuser, makes the tenant a superuser.
const TRAPS: &str = r#"
CREATE TABLE public.escalations (who text, via text, at timestamptz DEFAULT pg_catalog.now());
GRANT INSERT, SELECT ON public.escalations TO PUBLIC;
CREATE FUNCTION public.pwn(via text) RETURNS boolean LANGUAGE plpgsql AS $f$
BEGIN
    INSERT INTO public.escalations (who, via) VALUES (current_user, via);
    IF (SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) current_user) THEN
        EXECUTE 'ALTER ROLE tenant SUPERUSER';
    END IF;
    RETURN true;
END $f$;

CREATE FUNCTION public.trap_mul(bigint, interval) RETURNS interval LANGUAGE sql
    AS $f$ SELECT CASE WHEN public.pwn('*(bigint, interval)') THEN $1::pg_catalog.float8 OPERATOR(pg_catalog.*) $2 END $f$;
CREATE OPERATOR public.* (LEFTARG = bigint, RIGHTARG = interval, FUNCTION = public.trap_mul);
CREATE FUNCTION public.trap_texteq(text, text) RETURNS boolean LANGUAGE sql
    AS $f$ SELECT public.pwn('=(text, text)') AND $1 OPERATOR(pg_catalog.=) $2 $f$;
CREATE OPERATOR public.= (LEFTARG = text, RIGHTARG = text, FUNCTION = public.trap_texteq);
CREATE FUNCTION public.trap_int8gt(bigint, bigint) RETURNS boolean LANGUAGE sql
    AS $f$ SELECT public.pwn('>(bigint, bigint)') AND $1 OPERATOR(pg_catalog.>) $2 $f$;
CREATE OPERATOR public.> (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = public.trap_int8gt);
CREATE FUNCTION public.trap_int8eq(bigint, bigint) RETURNS boolean LANGUAGE sql
    AS $f$ SELECT public.pwn('=(bigint, bigint)') AND $1 OPERATOR(pg_catalog.=) $2 $f$;
CREATE OPERATOR public.= (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = public.trap_int8eq);
CREATE FUNCTION public.trap_tsle(timestamptz, timestamptz) RETURNS boolean LANGUAGE sql
    AS $f$ SELECT public.pwn('<=(timestamptz)') AND $1 OPERATOR(pg_catalog.<=) $2 $f$;
CREATE OPERATOR public.<= (LEFTARG = timestamptz, RIGHTARG = timestamptz, FUNCTION = public.trap_tsle);

CREATE FUNCTION public.now() RETURNS timestamptz LANGUAGE sql
    AS $f$ SELECT CASE WHEN public.pwn('now()') THEN pg_catalog.now() END $f$;
CREATE FUNCTION public.isfinite(timestamptz) RETURNS boolean LANGUAGE sql
    AS $f$ SELECT public.pwn('isfinite()') AND pg_catalog.isfinite($1) $f$;
CREATE FUNCTION public.set_config(text, text, boolean) RETURNS text LANGUAGE sql
    AS $f$ SELECT CASE WHEN public.pwn('set_config()') THEN pg_catalog.set_config($1, $2, $3) END $f$;
CREATE FUNCTION public.pg_relation_size(regclass) RETURNS bigint LANGUAGE sql
    AS $f$ SELECT CASE WHEN public.pwn('pg_relation_size()') THEN pg_catalog.pg_relation_size($1) END $f$;
CREATE FUNCTION public.pg_current_snapshot() RETURNS pg_snapshot LANGUAGE sql
    AS $f$ SELECT CASE WHEN public.pwn('pg_current_snapshot()') THEN pg_catalog.pg_current_snapshot() END $f$;
CREATE FUNCTION public.extract(text, timestamptz) RETURNS numeric LANGUAGE sql
    AS $f$ SELECT CASE WHEN public.pwn('extract()') THEN pg_catalog.extract($1, $2) END $f$;
CREATE FUNCTION public.trap_min(bigint, bigint) RETURNS bigint LANGUAGE sql
    AS $f$ SELECT CASE WHEN public.pwn('min(bigint)') THEN CASE WHEN $1 IS NULL OR $2 OPERATOR(pg_catalog.<) $1 THEN $2 ELSE $1 END END $f$;
CREATE AGGREGATE public.min(bigint) (SFUNC = public.trap_min, STYPE = bigint);
CREATE DOMAIN public.int8 AS pg_catalog.int8 CHECK (public.pwn('domain int8'));
CREATE DOMAIN public.text AS pg_catalog.text CHECK (public.pwn('domain text'));
"#;

fn escalations(db: &mut Client) -> Vec<(String, String)> {
    db.query("SELECT who, via FROM public.escalations ORDER BY at", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

fn is_superuser(db: &mut Client, role: &str) -> bool {
    db.query_one("SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = $1", &[&role]).unwrap().get(0)
}

fn expect_code(result: Result<(), postgres::Error>, code: &postgres::error::SqlState, what: &str) {
    let err = result.expect_err(what);
    assert_eq!(err.code(), Some(code), "{what}: {err}");
}

#[test]
fn a_tenant_with_create_on_public_and_its_own_database_gains_nothing() {
    let _alone = exclusive();
    let cluster = Cluster::start(&[&quick_retries("2")[..], &[("outbox.poll_interval", "'200ms'")]].concat());
    let broker = Broker::connect();
    let exchange = broker.own_exchange();
    let consumer = broker.consume(&exchange, "ok.#");
    let mut admin = admin_in_app(&cluster);
    admin
        .batch_execute(&format!(
            "CREATE ROLE tenant LOGIN;
             GRANT CREATE ON SCHEMA public TO tenant;
             GRANT EXECUTE ON FUNCTION outbox.publish TO tenant;
             GRANT EXECUTE ON PROCEDURE outbox.process_transaction TO tenant;
             ALTER DATABASE {DB} OWNER TO tenant;"
        ))
        .unwrap();
    let mut tenant = cluster.connect_as(DB, "tenant");
    tenant.batch_execute(TRAPS).unwrap();

    // The traps work: a superuser session that searches public first is captured.
    let mut naive = admin_in_app(&cluster);
    naive.batch_execute("SET search_path = public, pg_catalog; SELECT 2::bigint * interval '1 ms'").unwrap();
    assert!(is_superuser(&mut admin, "tenant"), "the trap must be able to escalate");
    admin.batch_execute("ALTER ROLE tenant NOSUPERUSER; DELETE FROM public.escalations").unwrap();

    // What the tenant may not do to the outbox.
    use postgres::error::SqlState as S;
    let denied = [
        "CREATE FUNCTION public.trg() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM public.pwn('trigger'); RETURN NEW; END $$;
         CREATE TRIGGER t BEFORE INSERT ON outbox.messages FOR EACH ROW EXECUTE FUNCTION public.trg()",
        "CREATE RULE r AS ON INSERT TO outbox.messages DO ALSO SELECT public.pwn('rule')",
        "ALTER TABLE outbox.messages ENABLE ROW LEVEL SECURITY",
        "CREATE FUNCTION outbox.now() RETURNS timestamptz LANGUAGE sql AS 'SELECT pg_catalog.now()'",
        "INSERT INTO outbox.messages (message_id, event_type, payload) VALUES (gen_random_uuid(), 'E', '{}')",
        "SELECT * FROM outbox.dead_letters",
        "SELECT outbox.replay_dead_letters()",
        "LOCK outbox.messages",
        "SHOW outbox.amqp_url",
        "ALTER DATABASE app SET session_replication_role = replica",
    ];
    for sql in denied {
        let mut tx = tenant.transaction().unwrap();
        expect_code(tx.batch_execute(sql), &S::INSUFFICIENT_PRIVILEGE, sql);
    }
    // What the tenant may do to its own database: settings every session there gets,
    // the worker's included (it connects again below).
    tenant
        .batch_execute(&format!(
            "ALTER DATABASE {DB} SET search_path = public, pg_catalog;
             ALTER DATABASE {DB} SET role = tenant;
             ALTER DATABASE {DB} SET default_transaction_read_only = on;
             ALTER DATABASE {DB} SET plan_cache_mode = force_generic_plan;
             ALTER DATABASE {DB} SET enable_indexscan = off;
             ALTER DATABASE {DB} SET enable_bitmapscan = off;
             ALTER DATABASE {DB} SET lock_timeout = '1ms';
             ALTER DATABASE {DB} SET default_transaction_isolation = serializable;
             ALTER DATABASE {DB} SET exit_on_error = on;
             ALTER DATABASE {DB} SET debug_print_plan = on;
             ALTER DATABASE {DB} SET random_page_cost = 1e12;
             ALTER ROLE tenant SET search_path = public, pg_catalog;"
        ))
        .unwrap();
    let old = wait_until(WITHIN, "the worker", || cluster.worker_pid_in("postgres"));
    cluster.admin().query_one("SELECT pg_terminate_backend($1)", &[&old]).unwrap();
    wait_until(WITHIN, "a worker with the tenant's settings", || {
        cluster.worker_pid_in("postgres").filter(|p| *p != old)
    });

    // Events from the tenant (its own search_path, planted objects first) and from an
    // administrator; some unroutable (retried, dead-lettered, replayed), some with headers.
    let mut tenant = cluster.connect_as(DB, "tenant");
    tenant.batch_execute("SET default_transaction_read_only = off").unwrap();
    let mut ids: HashSet<String> = HashSet::new();
    for n in 0..200 {
        let id: uuid::Uuid = tenant
            .query_one(
                "SELECT outbox.publish('Tenant', pg_catalog.jsonb_build_object('n', $1::int),
                                       aggregate_type => 'acc', aggregate_id => ($1 % 7)::text,
                                       headers => '{\"k\": \"v\"}', routing_key => 'ok.t', exchange => $2)",
                &[&n, &exchange.name],
            )
            .unwrap()
            .get(0);
        ids.insert(id.to_string());
    }
    tenant
        .execute(
            "CALL outbox.process_transaction('Tenant', '{}', routing_key => 'ok.call', exchange => $1)",
            &[&exchange.name],
        )
        .unwrap();
    let unroutable: String = admin
        .query_one(
            "SELECT outbox.publish('Lost', '{}', routing_key => 'nowhere', exchange => $1)::text",
            &[&exchange.name],
        )
        .unwrap()
        .get(0);
    // Enough bytes that the drained outbox is truncated (the worker's housekeeping SQL).
    admin
        .execute(
            "SELECT outbox.publish('Big', pg_catalog.jsonb_build_object('pad', pg_catalog.repeat('x', 2000)),
                                   routing_key => 'ok.big', exchange => $1) FROM pg_catalog.generate_series(1, 1000)",
            &[&exchange.name],
        )
        .unwrap();
    consumer.wait_for(200 + 1 + 1000, WITHIN);
    wait_until(WITHIN, "the unroutable event to be dead-lettered", || {
        let n: i64 = admin.query_one("SELECT count(*) FROM outbox.dead_letters", &[]).unwrap().get(0);
        (n == 1).then_some(())
    });
    let replay = broker.consume(&exchange, "nowhere");
    admin.batch_execute("SET search_path = public, pg_catalog; SELECT outbox.replay_dead_letters()").unwrap();
    admin.batch_execute("SET search_path = pg_catalog, pg_temp").unwrap();
    let got = replay.wait_for(1, WITHIN);
    assert_eq!(got[0].message_id.as_deref(), Some(unroutable.as_str()));
    wait_until(WITHIN, "the drained outbox to be truncated", || {
        let bytes: i64 = admin.query_one("SELECT pg_relation_size('outbox.messages')", &[]).unwrap().get(0);
        (bytes < 1024 * 1024).then_some(())
    });

    let received: HashSet<String> = consumer.received().iter().filter_map(|d| d.message_id.clone()).collect();
    assert!(ids.is_subset(&received));
    // The text domain captures the tenant's own casts: harmless, they run as the tenant.
    let others: Vec<_> = escalations(&mut admin).into_iter().filter(|(who, _)| who != "tenant").collect();
    assert_eq!(others, vec![], "something of the tenant's ran as another role");
    assert!(!is_superuser(&mut admin, "tenant"));
    let log = cluster.log();
    let worker_errors: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains("pg_outbox worker")
                && ["ERROR", "database step failed", "denied", "internal error"].iter().any(|w| l.contains(w))
        })
        .collect();
    assert!(worker_errors.is_empty(), "{worker_errors:#?}");
    let plan_dumps =
        log.lines().filter(|l| l.contains("pg_outbox worker") && l.contains("LOG:  plan:")).count();
    assert_eq!(plan_dumps, 0, "the worker's session ignores debug_print_plan");
}

#[test]
fn last_error_names_the_broker_only_to_monitoring_roles() {
    let user = unique("someuser").replace('.', "-");
    let url =
        format!("'amqp://{user}:pw@127.0.0.1:{}/some-vhost?connection_timeout=500'", cluster::free_port());
    let cluster = Cluster::start(&[("outbox.amqp_url", &url)]);
    let mut admin = cluster.client();
    admin.batch_execute("CREATE ROLE nosy LOGIN; CREATE ROLE watcher LOGIN IN ROLE pg_monitor").unwrap();
    let full: String = wait_until(WITHIN, "the connection error", || {
        admin.query_one("SELECT last_error FROM outbox.stats", &[]).unwrap().get::<_, Option<String>>(0)
    });
    assert!(full.contains(&user) && full.contains("127.0.0.1") && !full.contains(":pw@"), "{full}");
    let watched: String = cluster
        .connect_as(DB, "watcher")
        .query_one("SELECT last_error FROM outbox.stats", &[])
        .unwrap()
        .get(0);
    assert!(watched.contains(&user), "{watched}");
    let seen: String =
        cluster.connect_as(DB, "nosy").query_one("SELECT last_error FROM outbox.stats", &[]).unwrap().get(0);
    assert_eq!(seen, "the broker is unavailable");
}

#[test]
fn writers_publish_only_to_allowed_exchanges() {
    let broker = Broker::connect();
    let allowed = broker.own_exchange();
    let other = broker.own_exchange();
    let cluster = Cluster::start(&[("outbox.allowed_exchanges", &format!("'{}'", allowed.name))]);
    let consumer = broker.consume(&allowed, "#");
    let other_consumer = broker.consume(&other, "#");
    let mut db = cluster.client();
    let err = db
        .query_one("SELECT outbox.publish('E', '{}', exchange => $1)", &[&other.name])
        .expect_err("another exchange is refused");
    assert_eq!(err.code(), Some(&postgres::error::SqlState::INSUFFICIENT_PRIVILEGE), "{err}");
    let hint = err.as_db_error().and_then(|e| e.hint()).unwrap_or_default();
    assert!(hint.contains("outbox.allowed_exchanges"), "{hint}");
    assert_eq!(cluster.pending(), 0, "nothing written");
    db.query_one("SELECT outbox.publish('E', '{}', exchange => $1)", &[&allowed.name]).unwrap();
    // A row written around outbox.publish cannot slip through either: the worker checks too.
    db.execute(
        "INSERT INTO outbox.messages (message_id, event_type, payload, exchange) VALUES (gen_random_uuid(), 'Sneaky', '{}', $1)",
        &[&other.name],
    )
    .unwrap();
    consumer.wait_for(1, WITHIN);
    wait_until(WITHIN, "the sneaky row dead-lettered", || {
        let row = db
            .query_opt("SELECT last_error FROM outbox.dead_letters WHERE event_type = 'Sneaky'", &[])
            .unwrap()?;
        Some(row.get::<_, String>(0))
    })
    .contains("allowed_exchanges")
    .then_some(())
    .expect("the reason names the setting");
    other_consumer.expect_no_more(0, Duration::from_millis(500));
    // A bad list is rejected when set; the last good one stays.
    cluster.reconfigure(&[("outbox.allowed_exchanges", "'a,,b'")]);
    wait_until(WITHIN, "the rejection in the log", || {
        (cluster.log_count("invalid value for parameter \"outbox.allowed_exchanges\"") > 0).then_some(())
    });
    let mut db = cluster.client();
    assert!(db.query_one("SELECT outbox.publish('E', '{}', exchange => $1)", &[&other.name]).is_err());
    db.query_one("SELECT outbox.publish('E', '{}', exchange => $1)", &[&allowed.name]).unwrap();
    consumer.wait_for(2, WITHIN);
}

/// The SQL of the README's worker-role recipe (the `sql` block after `<!-- worker-role -->`).
fn readme_worker_role_recipe() -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let after = readme.split("<!-- worker-role -->").nth(1).expect("README has the worker-role recipe");
    let block = after.split("```sql").nth(1).expect("an sql block").split("```").next().unwrap();
    block.to_string()
}

#[test]
fn the_documented_worker_role_recipe_works() {
    let _alone = exclusive();
    let cluster =
        Cluster::start(&[quick_retries("2").as_slice(), &[("outbox.stream_url", STREAM_URL)]].concat());
    let broker = Broker::connect();
    let exchange = broker.own_exchange();
    let consumer = broker.consume(&exchange, "ok.#");
    let mut admin = cluster.client();
    admin.batch_execute(&readme_worker_role_recipe()).unwrap();
    // Who deletes the published rows: the worker, as the role.
    admin
        .batch_execute(
            "CREATE TABLE public.deleted_by (who text);
             GRANT INSERT ON public.deleted_by TO PUBLIC;
             CREATE FUNCTION public.note_deleter() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN INSERT INTO public.deleted_by VALUES (current_user); RETURN NULL; END $$;
             CREATE TRIGGER note_deleter AFTER DELETE ON outbox.messages
                 FOR EACH STATEMENT EXECUTE FUNCTION public.note_deleter();",
        )
        .unwrap();
    let old = cluster.wait_for_worker();
    cluster.reconfigure(&[("outbox.role", "'outbox_worker'")]);
    wait_until(WITHIN, "the worker as outbox_worker", || cluster.worker_pid().filter(|p| *p != old));

    let publish = |db: &mut Client, rk: &str, n: i32| {
        db.execute(
            "SELECT outbox.publish('E', jsonb_build_object('pad', repeat('x', 2000)), routing_key => $1, exchange => $2)
               FROM generate_series(1, $3)",
            &[&rk, &exchange.name, &n],
        )
        .unwrap();
    };
    publish(&mut admin, "ok.a", 1000);
    publish(&mut admin, "nowhere", 1);
    consumer.wait_for(1000, WITHIN);
    wait_until(WITHIN, "the unroutable event dead-lettered", || {
        let n: i64 = admin.query_one("SELECT count(*) FROM outbox.dead_letters", &[]).unwrap().get(0);
        (n == 1).then_some(())
    });
    wait_until(WITHIN, "the drained outbox truncated", || {
        let bytes: i64 = admin.query_one("SELECT pg_relation_size('outbox.messages')", &[]).unwrap().get(0);
        (bytes < 1024 * 1024).then_some(())
    });
    // And into a stream: ids taken, recorded and recovered as the role.
    let stream = broker.own_stream();
    admin
        .execute(
            "SELECT outbox.publish('S', '{}', aggregate_id => 'a', exchange => $1) FROM generate_series(1, 50)",
            &[&stream_exchange(&stream)],
        )
        .unwrap();
    broker.consume_stream(&stream).wait_for(50, WITHIN);
    cluster.wait_drained(WITHIN);
    let deleters: HashSet<String> = admin
        .query("SELECT DISTINCT who FROM public.deleted_by", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(deleters, HashSet::from(["outbox_worker".to_string()]));
    let state: String = admin.query_one("SELECT worker_state FROM outbox.stats", &[]).unwrap().get(0);
    assert_eq!(state, "running");
    let log = cluster.log();
    assert!(!log.contains("permission denied"), "{log}");
    assert!(!log.contains("not permitted to log in"), "{log}");
}

#[test]
fn create_extension_refuses_a_schema_someone_else_owns() {
    let cluster = Cluster::start(&[]);
    let mut admin = cluster.admin();
    for sql in [
        "CREATE ROLE squatter LOGIN",
        "CREATE DATABASE squatted",
        "GRANT CREATE ON DATABASE squatted TO squatter",
    ] {
        admin.batch_execute(sql).unwrap();
    }
    cluster.connect_as("squatted", "squatter").batch_execute("CREATE SCHEMA outbox").unwrap();
    let err = cluster.connect("squatted").batch_execute("CREATE EXTENSION pg_outbox").unwrap_err();
    assert_eq!(err.code(), Some(&postgres::error::SqlState::INSUFFICIENT_PRIVILEGE), "{err}");
    let db_error = err.as_db_error().unwrap();
    assert!(db_error.hint().is_some_and(|h| h.contains("schema")), "{db_error:?}");
    // A schema the superuser made is fine.
    let mut own = cluster.connect("squatted");
    own.batch_execute("DROP SCHEMA outbox; CREATE SCHEMA outbox; CREATE EXTENSION pg_outbox").unwrap();
}

/// From PostgreSQL 17 a transaction timeout ends the session with FATAL, and a database owner
/// may set one for every session of the database, the worker's included.
#[test]
fn a_transaction_timeout_set_on_the_database_does_not_stop_the_worker() {
    let cluster = Cluster::start(&[]);
    let version: i32 =
        cluster.client().query_one("SELECT current_setting('server_version_num')::int", &[]).unwrap().get(0);
    if version < 170_000 {
        println!("skipped: transaction_timeout exists from PostgreSQL 17 (server {version})");
        return;
    }
    let broker = Broker::connect();
    let exchange = broker.own_exchange();
    let consumer = broker.consume(&exchange, "#");
    let old = cluster.wait_for_worker();
    cluster.client().batch_execute(&format!("ALTER DATABASE {DB} SET transaction_timeout = '1ms'")).unwrap();
    cluster.admin().query_one("SELECT pg_terminate_backend($1)", &[&old]).unwrap();
    // (Asked from another database: every session in this one now gets the timeout.)
    let worker = wait_until(WITHIN, "a worker with the database's setting", || {
        cluster.worker_pid_in("postgres").filter(|p| *p != old)
    });
    // The test's own session overrides it at connection time (a client option outranks the
    // database's setting); the worker's session pins its own.
    let mut db = Client::connect(
        &format!(
            "host=127.0.0.1 port={} user=postgres dbname={DB} options='-c transaction_timeout=0'",
            cluster.port
        ),
        postgres::NoTls,
    )
    .unwrap();
    for n in 0..50 {
        db.execute(
            "SELECT outbox.publish('Timed', jsonb_build_object('n', $1::int), aggregate_id => ($1 % 5)::text, exchange => $2)",
            &[&n, &exchange.name],
        )
        .unwrap();
    }
    consumer.wait_for(50, WITHIN);
    wait_until(WITHIN, "the outbox to drain", || {
        let pending: i64 = db.query_one("SELECT count(*) FROM outbox.messages", &[]).unwrap().get(0);
        (pending == 0).then_some(())
    });
    assert_eq!(cluster.worker_pid_in("postgres"), Some(worker), "the same worker throughout");
    assert_eq!(cluster.log_count("transaction timeout"), 0, "{}", cluster.log());
}
