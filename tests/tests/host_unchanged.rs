//! With the library preloaded into every backend, nothing of a session that does not call
//! pg_outbox may change: its errors (every field), notices, plans and results are compared,
//! statement by statement, with the same cluster without the library. The server runs with
//! `RUST_BACKTRACE=1` in its environment, as a careless service manager might set it.

use pg_outbox_tests::*;
use postgres::{Client, Config, NoTls, SimpleQueryMessage};
use std::sync::{Arc, Mutex};

const SETUP: &str = r#"
CREATE TABLE t_int (v int);
CREATE TABLE t_unique (v int CONSTRAINT t_unique_pk PRIMARY KEY);
INSERT INTO t_unique VALUES (1);
CREATE TABLE t_dup (v int); INSERT INTO t_dup VALUES (1), (1);
CREATE TABLE t_chk (v int); INSERT INTO t_chk VALUES (-1);
CREATE TABLE t_notnull (v int NOT NULL);
CREATE PROCEDURE p_fails() LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'procedure failed' USING DETAIL = 'some detail', HINT = 'some hint', ERRCODE = '22012';
END $$;
CREATE FUNCTION f_nested(n int) RETURNS int LANGUAGE plpgsql AS $$
BEGIN
    IF n = 0 THEN RETURN 1 / n; END IF;
    RETURN f_nested(n - 1);
END $$;
"#;

/// Statements that fail, warn or answer, in any database.
const CORPUS: &[&str] = &[
    "DO $$ BEGIN RAISE EXCEPTION 'boom' USING DETAIL = 'd', HINT = 'h', ERRCODE = '22012'; END $$",
    "DO $$ BEGIN INSERT INTO t_unique VALUES (1); END $$",
    "DO $$ BEGIN PERFORM 1 / 0; END $$",
    "DO $$ BEGIN PERFORM f_nested(3); END $$",
    "DO $$ BEGIN RAISE NOTICE 'a notice' USING DETAIL = 'nd', HINT = 'nh'; RAISE WARNING 'a warning'; END $$",
    "CALL p_fails()",
    "CALL no_such_procedure()",
    "ALTER TABLE t_dup ADD CONSTRAINT t_dup_u UNIQUE (v)",
    "ALTER TABLE t_chk ADD CONSTRAINT t_chk_positive CHECK (v > 0)",
    "ALTER TABLE t_int ADD COLUMN v int",
    "CREATE TABLE t_int (v int)",
    "CREATE INDEX ON no_such_table (x)",
    "DROP TABLE IF EXISTS no_such_table",
    "DROP TABLE no_such_table",
    "VACUUM no_such_table",
    "COMMIT PREPARED 'no_such_gid'",
    "ROLLBACK PREPARED 'no_such_gid'",
    "PREPARE TRANSACTION 'outside_a_transaction'",
    "SET no_such_setting = 1",
    "SET work_mem = 'lots'",
    "INSERT INTO t_unique VALUES (1)",
    "INSERT INTO t_notnull VALUES (NULL)",
    "SELECT * FROM t_int WHERE v = 'abc'",
    "SELECT f_nested(2)",
    "SELECT 1 / 0",
    "EXPLAIN (COSTS OFF) SELECT * FROM t_unique WHERE v = 1",
    "EXPLAIN (COSTS OFF) SELECT count(*) FROM t_dup d JOIN t_unique u USING (v)",
    "SELECT v, v * 2 FROM t_dup ORDER BY v",
    "BEGIN; SAVEPOINT s; SELECT 1 / 0; ROLLBACK TO s; SELECT 42; COMMIT",
    "ROLLBACK",
];

fn connect(cluster: &Cluster, db: &str, notices: Arc<Mutex<Vec<String>>>) -> Client {
    let mut config: Config =
        format!("host=127.0.0.1 port={} user=postgres dbname={db}", cluster.port).parse().unwrap();
    config.notice_callback(move |n| notices.lock().unwrap().push(fields(&n)));
    config.connect(NoTls).unwrap()
}

/// Every field of an error or notice, as the client sees it.
fn fields(e: &postgres::error::DbError) -> String {
    format!(
        "severity={} code={} message={:?} detail={:?} hint={:?} position={:?} where={:?} schema={:?} \
         table={:?} column={:?} datatype={:?} constraint={:?} file={:?} line={:?} routine={:?}",
        e.severity(),
        e.code().code(),
        e.message(),
        e.detail(),
        e.hint(),
        e.position(),
        e.where_(),
        e.schema(),
        e.table(),
        e.column(),
        e.datatype(),
        e.constraint(),
        e.file(),
        e.line(),
        e.routine()
    )
}

/// What each statement of the corpus gave, in database `db`, after `preamble`.
fn run_corpus(cluster: &Cluster, db: &str, preamble: Option<&str>) -> Vec<String> {
    let notices = Arc::new(Mutex::new(Vec::new()));
    let mut client = connect(cluster, db, notices.clone());
    if let Some(sql) = preamble {
        client.batch_execute(sql).unwrap();
    }
    let mut out = Vec::new();
    for sql in CORPUS {
        let result = match client.simple_query(sql) {
            Ok(messages) => messages
                .iter()
                .filter_map(|m| match m {
                    SimpleQueryMessage::Row(r) => {
                        Some((0..r.len()).map(|i| r.get(i).unwrap_or("NULL")).collect::<Vec<_>>().join("|"))
                    }
                    _ => None,
                })
                .collect::<Vec<_>>()
                .join("\n"),
            Err(e) => format!("ERROR {}", e.as_db_error().map(fields).unwrap_or_else(|| e.to_string())),
        };
        let noticed = std::mem::take(&mut *notices.lock().unwrap());
        out.push(format!("{sql}\n  -> {result}\n  notices: {noticed:?}"));
    }
    // COPY with a bad line: the error's context names the line.
    let copy = (|| -> Result<u64, postgres::Error> {
        use std::io::Write;
        let mut w = client.copy_in("COPY t_int FROM STDIN")?;
        w.write_all(b"1\nnot a number\n3\n").unwrap();
        w.finish()
    })();
    out.push(format!("COPY -> {:?}", copy.map_err(|e| e.as_db_error().map(fields))));
    out
}

#[test]
fn errors_notices_plans_and_results_are_the_same_with_the_library_preloaded() {
    let _alone = exclusive();
    let mut cluster = Cluster::init(&[("shared_preload_libraries", "''")]);
    cluster.set_server_env("RUST_BACKTRACE", "1");
    cluster.start_server();
    for db in ["app", "other"] {
        cluster.admin().batch_execute(&format!("CREATE DATABASE {db}")).unwrap();
        cluster.connect(db).batch_execute(SETUP).unwrap();
    }
    let without: Vec<Vec<String>> =
        ["app", "other"].iter().map(|db| run_corpus(&cluster, db, None)).collect();

    cluster.stop();
    cluster.reconfigure_file(&[("shared_preload_libraries", "'pg_outbox'")]);
    cluster.start_server();
    cluster.client().batch_execute("CREATE EXTENSION pg_outbox").unwrap();
    cluster.wait_for_worker();
    // A session that did call pg_outbox, then goes on with the corpus: its own later errors
    // are untouched too.
    let with = vec![
        run_corpus(&cluster, "app", Some("SELECT outbox.publish('Called', '{}')")),
        run_corpus(&cluster, "other", None),
    ];

    for (db, (a, b)) in ["app", "other"].iter().zip(without.iter().zip(&with)) {
        for (x, y) in a.iter().zip(b) {
            assert_eq!(x, y, "in database {db}");
        }
    }
    let all = with.concat().join("\n");
    assert!(
        !all.contains("backtrace") && !all.contains("rust_begin_unwind"),
        "a Rust backtrace leaked:\n{all}"
    );
    // The corpus really exercised the fields that were lost before.
    for must in [
        "where=Some(\"PL/pgSQL function",
        "constraint=Some(\"t_unique_pk\")",
        "COPY t_int, line 2",
        "constraint=Some(\"t_dup_u\")",
    ] {
        assert!(all.contains(must), "{must} missing from:\n{all}");
    }
}
