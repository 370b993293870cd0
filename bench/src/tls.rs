//! TLS: what `amqps://` costs. A second RabbitMQ node (the test harness' TLS node, no client
//! certificate required) takes the same messages over its plain and its TLS listener: the bare
//! publisher and the relay each over both, alternating, so every figure has a baseline from
//! the same node in the same run.

use crate::cpu::measure;
use crate::relay::{bounded_queue, published_total, write_backlog};
use crate::{progress, raw, Row};
use pg_outbox_tests::{unique, wait_until, Broker, Cluster, TlsNode};
use std::time::{Duration, Instant};

/// The node's Erlang VM, for its CPU: the newest one (the node was just started).
fn node_pid() -> u32 {
    let out = std::process::Command::new("pgrep").args(["-n", "beam.smp"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0)
}

pub fn tls(count: u64) -> Vec<Row> {
    progress("starting a RabbitMQ node with a TLS listener");
    let node = TlsNode::start(false);
    let broker = Broker::connect_to(node.amqp_port);
    let exchange = unique("bench.tls");
    broker.exchange(&exchange);
    let mut queue = bounded_queue(&broker, &exchange);
    let beam = node_pid();
    let plain_url = format!("'amqp://guest:guest@127.0.0.1:{}/%2F'", node.amqp_port);
    let tls_url = format!("'amqps://guest:guest@localhost:{}/%2F'", node.tls_port);
    let ca = format!("'{}'", node.certs.ca.display());
    let unreachable = pg_outbox_tests::unreachable_broker_url();
    let cluster = Cluster::start(&crate::settings(&[
        ("outbox.amqp_url", unreachable.as_str()),
        ("outbox.amqp_tls_ca_file", ca.as_str()),
    ]));
    cluster.wait_for_worker();

    let mut raw_run = |tls: bool| {
        let target = raw::Target {
            port: if tls { node.tls_port } else { node.amqp_port },
            tls_ca: tls.then(|| node.certs.ca.clone()),
        };
        let me = std::process::id();
        let (rate, _, cpu) = measure(&[me, beam], || {
            raw::publish_rate_to(&target, &exchange, "FundsTransferEvent", count, 1000, true)
        });
        progress(&format!(
            "  raw over {}: {rate:.0} msgs/s; CPU per message: publisher {:.0} µs, RabbitMQ {:.0} µs",
            if tls { "amqps" } else { "amqp" },
            cpu[0] * 1e6 / count as f64,
            cpu[1] * 1e6 / count as f64
        ));
        broker.delete_queue(&queue);
        queue = bounded_queue(&broker, &exchange);
        rate
    };
    let relay_run = |url: &str| {
        write_backlog(&cluster, &exchange, count);
        let worker = cluster.wait_for_worker() as u32;
        let before = published_total(&cluster);
        let (rate, _, cpu) = measure(&[worker, beam], || {
            let started = Instant::now();
            cluster.reconfigure(&[("outbox.amqp_url", url)]);
            wait_until(Duration::from_secs(600), "the backlog to drain", || {
                (published_total(&cluster) - before >= count as i64).then_some(())
            });
            count as f64 / started.elapsed().as_secs_f64()
        });
        let per_event = (cpu[0] * 1e6 / count as f64, cpu[1] * 1e6 / count as f64);
        progress(&format!(
            "  relay over {}: {rate:.0} events/s; CPU per event: worker {:.0} µs, RabbitMQ {:.0} µs",
            if url.contains("amqps") { "amqps" } else { "amqp" },
            per_event.0,
            per_event.1
        ));
        cluster.cut_off_broker();
        (rate, per_event.0)
    };

    progress(&format!("{count} messages each way, alternating plain and TLS, twice"));
    let mut raw_plain = Vec::new();
    let mut raw_tls = Vec::new();
    let mut relay_plain = Vec::new();
    let mut relay_tls = Vec::new();
    for _ in 0..2 {
        raw_plain.push(raw_run(false));
        raw_tls.push(raw_run(true));
        relay_plain.push(relay_run(&plain_url));
        relay_tls.push(relay_run(&tls_url));
    }
    broker.delete_queue(&queue);
    broker.delete_exchange(&exchange);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let rates = |v: &[f64]| v.iter().map(|r| format!("{r:.0}")).collect::<Vec<_>>().join(", ");
    let relay_tls_rate = mean(&relay_tls.iter().map(|r| r.0).collect::<Vec<_>>());
    let relay_plain_rate = mean(&relay_plain.iter().map(|r| r.0).collect::<Vec<_>>());
    let cpu_tls = mean(&relay_tls.iter().map(|r| r.1).collect::<Vec<_>>());
    let cpu_plain = mean(&relay_plain.iter().map(|r| r.1).collect::<Vec<_>>());
    let (raw_tls_rate, raw_plain_rate) = (mean(&raw_tls), mean(&raw_plain));
    let tls_ratio = relay_tls_rate / raw_tls_rate;
    vec![
        Row {
            figure: format!("TLS: relay drain of {count} events over amqps (second node)"),
            value: format!(
                "{relay_tls_rate:.0} events/s ({})",
                rates(&relay_tls.iter().map(|r| r.0).collect::<Vec<_>>())
            ),
            baseline: format!(
                "{raw_tls_rate:.0} msgs/s raw amqprs publisher over amqps ({})",
                rates(&raw_tls)
            ),
            ratio: Some(tls_ratio),
            target: "≥ 80% of raw, as over amqp".into(),
            met: Some(tls_ratio >= 0.8),
        },
        Row {
            figure: "TLS: relay over amqps against over amqp (same node, same events)".into(),
            value: format!("{relay_tls_rate:.0} events/s, worker {cpu_tls:.0} µs CPU/event"),
            baseline: format!("{relay_plain_rate:.0} events/s, worker {cpu_plain:.0} µs CPU/event"),
            ratio: Some(relay_tls_rate / relay_plain_rate),
            target: format!(
                "reported (raw publisher: {:.0}% of its amqp rate)",
                raw_tls_rate / raw_plain_rate * 100.0
            ),
            met: None,
        },
    ]
}
