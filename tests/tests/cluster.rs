//! A RabbitMQ cluster: extra nodes joined to the machine's broker for the test. The worker is
//! given the URLs of the cluster's nodes (`outbox.amqp_url` as a comma-separated list); when
//! the node it publishes through stops serving, it moves on to the next one, and publishes
//! again what was not confirmed: nothing committed is lost, duplicates are allowed, order
//! within an aggregate holds. Tests run one at a time: they change the machine's cluster.

use pg_outbox_tests::cluster_node::{ClusterNode, COORDINATOR_REPAIRS};
use pg_outbox_tests::*;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const WITHIN: Duration = Duration::from_secs(90);
/// How long the node the worker uses stays stopped.
const OUTAGE: Duration = Duration::from_secs(5);

/// `outbox.amqp_url` as written in postgresql.conf: the nodes' URLs in the order given.
fn url_list(urls: &[String]) -> String {
    format!("'{}'", urls.join(", "))
}

fn machine_url() -> String {
    "amqp://guest:guest@127.0.0.1:5672/%2F".to_string()
}

/// Log lines saying that the worker connected to the node on `port`.
fn connections_to(cluster: &Cluster, port: u16) -> usize {
    let at = format!("@127.0.0.1:{port}/");
    cluster.log().lines().filter(|l| l.contains("pg_outbox: connected to") && l.contains(&at)).count()
}

fn stats(cluster: &Cluster) -> (Option<bool>, Option<String>) {
    let row =
        cluster.client().query_one("SELECT broker_connected, last_error FROM outbox.stats", &[]).unwrap();
    (row.get(0), row.get(1))
}

/// Waits until the worker is connected through the node on `port` (its log says so, and
/// `outbox.stats` says it is connected now) and `consumer` has received more than `after`.
fn wait_publishing_through(cluster: &Cluster, port: u16, consumer: &Consumer, after: usize) {
    wait_until(WITHIN, &format!("the worker to publish through the node on port {port}"), || {
        (connections_to(cluster, port) > 0 && stats(cluster).0 == Some(true) && consumer.count() > after)
            .then_some(())
    });
}

/// Waits for the outbox to drain and every committed event to arrive, then judges.
fn settle_and_verify(
    cluster: &Cluster,
    consumer: &Consumer,
    rolled_back: &std::collections::HashSet<uuid::Uuid>,
) -> Verdict {
    cluster.wait_drained(WITHIN);
    let committed: i64 = cluster.client().query_one("SELECT count(*) FROM ledger", &[]).unwrap().get(0);
    let deadline = Instant::now() + WITHIN;
    while (dedup(&consumer.received()).0.len() as i64) < committed && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    verify(cluster, &consumer.received(), rolled_back)
}

/// Stops the application of `node` (which the worker publishes through) for [`OUTAGE`] while
/// `load` writes; checks that publishing went on through the node on `next_port` meanwhile,
/// then starts the node again.
fn stop_node_in_use(cluster: &Cluster, consumer: &Consumer, node: &ClusterNode, next_port: u16) {
    let before = connections_to(cluster, next_port);
    assert_eq!(before, 0, "the worker has not used the node on port {next_port} yet:\n{}", cluster.log());
    let stopped = Instant::now();
    node.stop_app();
    println!("stopped the application of {} in {:.1?}", node.node_name(), stopped.elapsed());
    let delivered = consumer.count();
    wait_publishing_through(cluster, next_port, consumer, delivered);
    println!(
        "publishing through port {next_port} {:.1?} after the stop; last_error: {:?}",
        stopped.elapsed(),
        stats(cluster).1
    );
    std::thread::sleep(OUTAGE.saturating_sub(stopped.elapsed()));
    assert!(consumer.count() > delivered, "events kept arriving while {} was stopped", node.node_name());
    let restarted = Instant::now();
    node.start_app();
    println!("started the application of {} again in {:.1?}", node.node_name(), restarted.elapsed());
}

/// The nodes that hold a member of the quorum queue `queue`, as the machine's node says.
fn quorum_members(queue: &str) -> Vec<String> {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["-n", "rabbit@localhost", "list_queues", "name", "members", "--formatter", "json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let queues: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let of_queue = queues.as_array().unwrap().iter().find(|q| q["name"] == queue);
    let members = of_queue.and_then(|q| q["members"].as_array()).into_iter().flatten();
    members.filter_map(|m| m.as_str().map(String::from)).collect()
}

/// AMQP connections the cluster has on the node listening on `port` (all of them the worker's
/// in these tests, except on the machine's node).
fn connections_on(port: u16) -> usize {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["-n", "rabbit@localhost", "list_connections", "port", "--formatter", "json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let connections: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    connections.as_array().unwrap().iter().filter(|c| c["port"] == port).count()
}

/// Deletes a queue when dropped, pass or fail: a quorum queue with members on nodes that
/// leave the cluster would be left without a majority.
struct QueueDeleted<'b>(&'b Broker, String);

impl Drop for QueueDeleted<'_> {
    fn drop(&mut self) {
        self.0.delete_queue(&self.1);
    }
}

/// RabbitMQ's stream coordinator, a Raft cluster over every node, takes nodes that join in as
/// members (one every 30 s). Two nodes that stopped before they were taken out again would leave
/// the machine's node a minority of the coordinator, unable to elect itself or change the
/// membership, and refusing every new stream, across restarts (so twice the first stream test
/// after this suite failed). Each node leaving takes itself out first, while the others still
/// run: the coordinator needs no repair, and a stream can be declared at once.
#[test]
fn nodes_that_leave_take_themselves_out_of_the_stream_coordinator() {
    let _alone = exclusive();
    let broker = Broker::connect();
    // The coordinator starts with the first stream.
    drop(broker.own_stream());
    let nodes = ClusterNode::join_many(2);
    wait_until(Duration::from_secs(180), "the stream coordinator to take both nodes in", || {
        nodes.iter().all(ClusterNode::in_stream_coordinator).then_some(())
    });
    let repairs = COORDINATOR_REPAIRS.load(Ordering::Relaxed);
    drop(nodes);
    assert_eq!(COORDINATOR_REPAIRS.load(Ordering::Relaxed), repairs, "the coordinator had to be repaired");
    drop(broker.own_stream());
}

#[test]
fn publishing_moves_to_another_node_when_the_one_in_use_stops() {
    let _alone = exclusive();
    let started = Instant::now();
    let node = ClusterNode::join();
    let joined = started.elapsed();
    moves_to_the_machine_node(&node);
    let leaving = Instant::now();
    drop(node);
    println!(
        "test took {:.1?} (joining the node {joined:.1?}, leaving {:.1?})",
        started.elapsed(),
        leaving.elapsed()
    );
}

fn moves_to_the_machine_node(node: &ClusterNode) {
    // Exchange and queue through the machine's node; the worker tries the extra node first.
    let broker = Broker::connect();
    let exchange = broker.own_exchange();
    let consumer = broker.consume(&exchange, "#");
    let _queue = QueueDeleted(&broker, consumer.queue.clone());
    let cluster = Cluster::start(&[
        ("outbox.amqp_url", &url_list(&[node.url(), machine_url()])),
        ("outbox.reconnect_backoff_max", "'1s'"),
    ]);
    cluster.wait_for_worker();
    let load = Load::start(&cluster, LoadSpec::new(&exchange));
    wait_publishing_through(&cluster, node.port(), &consumer, 0);

    stop_node_in_use(&cluster, &consumer, node, 5672);
    std::thread::sleep(Duration::from_secs(2));
    let rolled_back = load.stop();
    let verdict = settle_and_verify(&cluster, &consumer, &rolled_back);
    println!("publishing node stopped for {OUTAGE:?}, one other node in the list: {verdict}");
    verdict.assert_clean();
    assert_eq!(connections_to(&cluster, 5672), 1, "moved once to the machine's node:\n{}", cluster.log());
    assert!(!cluster.log().contains("guest:guest"), "no password in the log");
}

#[test]
fn a_quorum_queue_keeps_taking_events_while_one_of_three_nodes_is_down() {
    let _alone = exclusive();
    let started = Instant::now();
    let nodes = ClusterNode::join_many(2);
    let joined = started.elapsed();
    for node in nodes.iter() {
        println!("{}: {} MB resident", node.node_name(), node.resident_mb());
    }
    continues_through_the_next_node(&nodes);
    let leaving = Instant::now();
    drop(nodes);
    println!(
        "test took {:.1?} (joining two nodes {joined:.1?}, leaving {:.1?})",
        started.elapsed(),
        leaving.elapsed()
    );
}

/// Publishers (connections) of the worker in the quorum queue test: a lost connection takes
/// them all to the next node.
const PUBLISHERS: usize = 3;

fn continues_through_the_next_node(nodes: &[ClusterNode]) {
    let broker = Broker::connect();
    let exchange = broker.own_exchange();
    let mut arguments = amqprs::FieldTable::new();
    arguments.insert("x-queue-type".try_into().unwrap(), amqprs::FieldValue::S("quorum".try_into().unwrap()));
    let queue = broker.declare_queue(&exchange, "#", arguments);
    let _queue = QueueDeleted(&broker, queue.clone());
    let members = quorum_members(&queue);
    assert!(
        members.len() == 3 && nodes.iter().all(|n| members.iter().any(|m| m == n.node_name())),
        "the quorum queue has a member on each of the three nodes: {members:?}"
    );
    let consumer = broker.consume_queue(&queue, &exchange);
    let cluster = Cluster::start(&[
        ("outbox.amqp_url", &url_list(&[nodes[0].url(), nodes[1].url(), machine_url()])),
        ("outbox.publishers", &PUBLISHERS.to_string()),
        ("outbox.reconnect_backoff_max", "'1s'"),
    ]);
    cluster.wait_for_worker();
    let load = Load::start(&cluster, LoadSpec::new(&exchange));
    wait_publishing_through(&cluster, nodes[0].port(), &consumer, 0);
    wait_until(WITHIN, "the worker's three connections to the first node", || {
        (connections_on(nodes[0].port()) == PUBLISHERS).then_some(())
    });

    // Two of the queue's three members remain: a majority, so it keeps confirming.
    stop_node_in_use(&cluster, &consumer, &nodes[0], nodes[1].port());
    assert_eq!(connections_on(nodes[1].port()), PUBLISHERS, "all the publishers moved to the next node");
    std::thread::sleep(Duration::from_secs(2));
    let rolled_back = load.stop();
    let verdict = settle_and_verify(&cluster, &consumer, &rolled_back);
    println!("quorum queue, publishing node stopped for {OUTAGE:?}: {verdict}");
    verdict.assert_clean();
    assert_eq!(
        connections_to(&cluster, nodes[1].port()),
        1,
        "moved once to the next node:\n{}",
        cluster.log()
    );
    assert_eq!(
        connections_to(&cluster, 5672),
        0,
        "the second node in the list took over:\n{}",
        cluster.log()
    );
    for node in nodes {
        println!("{}: {} MB resident after the test", node.node_name(), node.resident_mb());
    }
}
