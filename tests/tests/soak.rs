//! The soak: concurrent writers for `OUTBOX_SOAK_SECONDS` (default 60) while the broker is
//! bounced, connections are cut, and the worker is killed (a crash restart of the server) and
//! terminated. Reports committed, received, duplicates, lost, order violations and rolled-back
//! events received; the last three must be zero.

use pg_outbox_tests::*;
use std::time::{Duration, Instant};

#[test]
fn soak_with_faults() {
    let _alone = exclusive();
    let seconds: u64 = std::env::var("OUTBOX_SOAK_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let total = Duration::from_secs(seconds.max(20));
    let broker = Broker::connect();
    let exchange = unique("ex");
    broker.exchange(&exchange);
    let queue = broker.queue(&exchange, "#");
    drop(broker);
    let proxy = Proxy::start(5672);
    let url = proxy.url();
    let cluster = Cluster::start(&[("outbox.amqp_url", &url), ("outbox.reconnect_backoff_max", "'1s'")]);
    cluster.wait_for_worker();

    let spec = LoadSpec { writers: 4, aggregates: 40, ..LoadSpec::new(&exchange) };
    let started = Instant::now();
    let load = Load::start(&cluster, spec.clone());
    let at = |fraction: f64| {
        let due = total.mul_f64(fraction);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
    };
    let mut faults = Vec::new();

    at(0.2);
    let outage = BrokerOutage::begin();
    std::thread::sleep(Duration::from_secs(5));
    outage.end();
    faults.push("broker stopped for 5 s (rabbitmqctl stop_app/start_app)");

    at(0.45);
    let pid = cluster.wait_for_worker();
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_until(Duration::from_secs(60), "a new worker", || cluster.worker_pid().filter(|p| *p != pid));
    faults.push("worker killed with SIGKILL (crash restart of the server)");

    at(0.65);
    for _ in 0..3 {
        proxy.cut();
        std::thread::sleep(Duration::from_millis(500));
    }
    faults.push("broker connection cut 3 times");

    at(0.8);
    let pid = cluster.wait_for_worker();
    cluster.admin().query_one("SELECT pg_terminate_backend($1)", &[&pid]).unwrap();
    faults.push("worker terminated (pg_terminate_backend)");

    at(1.0);
    let commits = load.commits.load(std::sync::atomic::Ordering::Relaxed);
    let errors = load.errors.load(std::sync::atomic::Ordering::Relaxed);
    let rolled_back = load.stop();
    let wrote_for = started.elapsed();

    cluster.wait_drained(Duration::from_secs(120));
    let drained_after = started.elapsed();
    let committed: i64 = cluster.client().query_one("SELECT count(*) FROM ledger", &[]).unwrap().get(0);
    let broker = Broker::connect();
    let consumer = broker.consume_queue(&queue, &exchange);
    let deadline = Instant::now() + Duration::from_secs(120);
    while (dedup(&consumer.received()).0.len() as i64) < committed && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(1));
    let verdict = verify(&cluster, &consumer.received(), &rolled_back);
    println!(
        "soak: {} writers, {} aggregates, {wrote_for:.0?} of writing ({commits} transactions committed, {} rolled back \
         on purpose, {errors} client errors during faults); outbox drained {:.1?} after writing stopped",
        spec.writers,
        spec.aggregates,
        rolled_back.len(),
        drained_after - wrote_for
    );
    println!("soak faults: {}", faults.join("; "));
    println!("soak verdict: {verdict}");
    broker.delete_queue(&queue);
    broker.delete_exchange(&exchange);
    verdict.assert_clean();
    assert!(!rolled_back.is_empty());
}
