//! TLS to the broker: a real second RabbitMQ node with a TLS listener that requires a client
//! certificate, certificates made with openssl for this run. The worker publishes only when
//! the broker's certificate chains to the configured CA, carries the host name of the URL,
//! and the broker accepts the worker's certificate; each problem shows in `outbox.stats` and
//! once in the log, nothing is published meanwhile, and fixing the setting with a reload
//! publishes what waited.

use pg_outbox_tests::*;
use postgres::error::SqlState;
use std::path::Path;
use std::time::Duration;

const WITHIN: Duration = Duration::from_secs(90);

fn quoted(path: &Path) -> String {
    format!("'{}'", path.display())
}

fn amqps_url(host: &str, port: u16) -> String {
    format!("'amqps://guest:guest@{host}:{port}/%2F?connection_timeout=5000'")
}

fn last_error(cluster: &Cluster) -> String {
    cluster.client().query_one("SELECT coalesce(last_error, '') FROM outbox.stats", &[]).unwrap().get(0)
}

/// Waits until the worker, not connected, reports an error containing `text`.
fn wait_refused(cluster: &Cluster, text: &str) -> String {
    wait_until(WITHIN, &format!("last_error to mention {text:?}"), || {
        let error = last_error(cluster);
        (!cluster.broker_connected() && error.contains(text)).then_some(error)
    })
}

fn publish(cluster: &Cluster, exchange: &str, n: i32) {
    cluster
        .client()
        .execute(
            "SELECT outbox.publish('Tls', jsonb_build_object('n', $2::int), exchange => $1)",
            &[&exchange, &n],
        )
        .unwrap();
}

/// Waits until the worker is refused with an error containing `text` (in `outbox.stats`), then
/// until it has failed three more times (each failed attempt stamps `last_error_at`): the
/// outage is still logged once. The worker logs the first reason of an outage only; where the
/// same refusal can read as another error (`also`), that one may be the line logged.
fn refused_and_logged_once(cluster: &Cluster, text: &str, also: &[&str]) -> String {
    let error = wait_refused(cluster, text);
    let stamp = || -> String {
        cluster.client().query_one("SELECT last_error_at::text FROM outbox.stats", &[]).unwrap().get(0)
    };
    let mut seen = vec![stamp()];
    wait_until(WITHIN, "three more failed attempts", || {
        let now = stamp();
        if seen.last() != Some(&now) {
            seen.push(now);
        }
        (seen.len() > 3).then_some(())
    });
    // Still refused for the same reason. A TLS 1.3 client learns that its missing certificate
    // was refused from the server's alert or from the connection closing, whichever it reads
    // first, so one attempt may name the other: the reason must come back, not hold every time.
    let mut others = Vec::new();
    wait_until(WITHIN, "still refused for the same reason", || {
        let now = last_error(cluster);
        if now.contains(text) {
            return Some(());
        }
        if !others.contains(&now) {
            others.push(now);
        }
        None
    });
    if !others.is_empty() {
        eprintln!("refused for {text:?}; meanwhile also: {others:?}");
    }
    let logged = cluster.log_count(text) + also.iter().map(|a| cluster.log_count(a)).sum::<usize>();
    assert_eq!(logged, 1, "{text:?} (or {also:?}) logged once:\n{}", cluster.log());
    error
}

#[test]
fn amqps_publishes_only_when_both_certificates_and_the_host_name_check_out() {
    let _alone = exclusive();
    let node = TlsNode::start(true);
    let certs = &node.certs;
    // Between the worker and the TLS listener (so that `localhost` and `127.0.0.1` both reach it).
    let proxy = Proxy::start(node.tls_port);
    let broker = Broker::connect_to(node.amqp_port);
    let exchange = broker.own_exchange();
    let consumer = broker.consume(&exchange, "#");
    let good_url = amqps_url("localhost", proxy.port);
    // A CA file that does not exist yet when the server starts: Postgres refuses the value and
    // keeps the default (empty, "the system's roots").
    let late_ca = certs.dir.join("late-ca.pem");
    let cluster = Cluster::start(&[
        ("outbox.amqp_url", good_url.as_str()),
        ("outbox.reconnect_backoff_max", "'500ms'"),
        ("outbox.amqp_tls_ca_file", &quoted(&late_ca)),
        ("outbox.amqp_tls_cert_file", &quoted(&certs.client_cert)),
        ("outbox.amqp_tls_key_file", &quoted(&certs.client_key)),
    ]);
    publish(&cluster, &exchange.name, 1);

    // 0. The worker does not fall back to the system's roots: it does not connect at all.
    let error = refused_and_logged_once(&cluster, "not falling back", &[]);
    println!("CA file refused at start: {error}");

    // 1. The file appears, holding a CA that did not sign the broker's certificate.
    std::fs::copy(&certs.other_ca, &late_ca).unwrap();
    cluster.reconfigure(&[]);
    let error = refused_and_logged_once(&cluster, "UnknownIssuer", &[]);
    println!("unknown CA: {error}");
    assert_eq!(consumer.count(), 0);

    // The right CA, reloaded: what waited is published.
    cluster.reconfigure(&[("outbox.amqp_tls_ca_file", &quoted(&certs.ca))]);
    consumer.wait_for(1, WITHIN);
    assert!(cluster.broker_connected());

    // 2. The right CA, but the URL names the broker by an address its certificate does not
    // carry (it names only localhost).
    cluster.reconfigure(&[("outbox.amqp_url", &amqps_url("127.0.0.1", proxy.port))]);
    let error = refused_and_logged_once(&cluster, "not valid for name", &[]);
    println!("wrong name: {error}");
    publish(&cluster, &exchange.name, 2);

    // 3. The right name, but no client certificate: the broker requires one.
    cluster.reconfigure(&[
        ("outbox.amqp_url", good_url.as_str()),
        ("outbox.amqp_tls_cert_file", "''"),
        ("outbox.amqp_tls_key_file", "''"),
    ]);
    // TLS 1.3: the refusal reaches the client as the broker's alert or as the connection it
    // closes, whichever it reads first; the outage's one log line may name either.
    let error = refused_and_logged_once(&cluster, "CertificateRequired", &["peer closed connection"]);
    println!("no client certificate: {error}");
    assert!(!error.contains("guest:"), "no password in the error: {error}");
    assert_eq!(consumer.count(), 1, "nothing published while refused");

    // Everything right: the waiting event is published, once.
    cluster.reconfigure(&[
        ("outbox.amqp_tls_cert_file", &quoted(&certs.client_cert)),
        ("outbox.amqp_tls_key_file", &quoted(&certs.client_key)),
    ]);
    let got = consumer.wait_for(2, WITHIN);
    let ns: Vec<i64> = got.iter().map(|d| d.json()["n"].as_i64().unwrap()).collect();
    assert_eq!(ns, vec![1, 2]);
    cluster.wait_drained(WITHIN);
    consumer.expect_no_more(2, Duration::from_millis(500));
    assert!(!cluster.log().contains("guest:guest"), "no password in the log");
}

#[test]
fn tls_files_are_checked_when_set_and_only_superusers_see_or_set_them() {
    struct Removed(std::path::PathBuf);
    impl Drop for Removed {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let dir = std::env::temp_dir().join(format!("pg_outbox_tls_settings_{}", std::process::id()));
    let _removed = Removed(dir.clone());
    let certs = Certificates::make(&dir);
    let cluster = Cluster::start(&[]);
    let mut admin = cluster.admin();
    let set = |admin: &mut postgres::Client, name: &str, value: &str| {
        admin.batch_execute(&format!("ALTER SYSTEM SET {name} = '{value}'"))
    };

    // Good files and an amqps:// URL are taken.
    set(&mut admin, "outbox.amqp_tls_ca_file", certs.ca.to_str().unwrap()).unwrap();
    set(&mut admin, "outbox.amqp_tls_cert_file", certs.client_cert.to_str().unwrap()).unwrap();
    set(&mut admin, "outbox.amqp_tls_key_file", certs.client_key.to_str().unwrap()).unwrap();
    set(&mut admin, "outbox.amqp_url", "amqps://guest:guest@localhost/%2F").unwrap();

    // Bad ones are refused with the setting, the path and the reason; never the contents.
    let not_pem = dir.join("not-pem.txt");
    std::fs::write(&not_pem, "sup3r-secret-contents").unwrap();
    let unreadable = dir.join("root-only.key");
    std::fs::copy(&certs.client_key, &unreadable).unwrap();
    std::fs::set_permissions(&unreadable, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let open_key = dir.join("open.key");
    std::fs::copy(&certs.client_key, &open_key).unwrap();
    std::fs::set_permissions(&open_key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let cases: [(&str, &Path, &str); 7] = [
        ("outbox.amqp_tls_ca_file", Path::new("/nonexistent/ca.pem"), "No such file"),
        ("outbox.amqp_tls_ca_file", &not_pem, "no PEM certificate"),
        ("outbox.amqp_tls_cert_file", &certs.client_key, "no PEM certificate"),
        ("outbox.amqp_tls_key_file", &certs.client_cert, "no PEM private key"),
        ("outbox.amqp_tls_key_file", &unreadable, "Permission denied"),
        ("outbox.amqp_tls_key_file", &open_key, "accessible to others (mode 0644)"),
        ("outbox.amqp_tls_ca_file", Path::new("/dev/zero"), "not a regular file"),
    ];
    for (name, path, reason) in cases {
        let err = set(&mut admin, name, path.to_str().unwrap()).unwrap_err();
        assert_eq!(err.code(), Some(&SqlState::INVALID_PARAMETER_VALUE), "{name} {path:?}: {err}");
        let db = err.as_db_error().unwrap();
        let message = db.message();
        assert!(message.contains(name) && message.contains(path.to_str().unwrap()), "{message}");
        assert!(message.contains(reason), "{name} {path:?}: {message}");
        assert!(db.hint().is_some_and(|h| h.contains("PEM")), "{:?}", db.hint());
        assert!(!message.contains("sup3r-secret"), "{message}");
    }
    // Nothing refused was kept.
    let auto = std::fs::read_to_string(cluster.data().join("postgresql.auto.conf")).unwrap();
    assert!(auto.contains(certs.client_key.to_str().unwrap()) && !auto.contains("root-only"), "{auto}");

    // Another role can neither set nor read them.
    admin.batch_execute("CREATE ROLE tenant LOGIN").unwrap();
    let mut tenant = cluster.connect_as(DB, "tenant");
    for name in ["outbox.amqp_tls_ca_file", "outbox.amqp_tls_cert_file", "outbox.amqp_tls_key_file"] {
        let err = tenant.batch_execute(&format!("ALTER SYSTEM SET {name} = '/tmp/x.pem'")).unwrap_err();
        assert_eq!(err.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{err}");
        let err = tenant.batch_execute(&format!("SHOW {name}")).unwrap_err();
        assert_eq!(err.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{err}");
        let err = tenant.batch_execute(&format!("SET {name} = ''")).unwrap_err();
        assert!(err.code().is_some(), "{err}");
    }
    let visible: i64 = tenant
        .query_one("SELECT count(*) FROM pg_settings WHERE name LIKE 'outbox.amqp_tls%'", &[])
        .unwrap()
        .get(0);
    assert_eq!(visible, 0);
}
