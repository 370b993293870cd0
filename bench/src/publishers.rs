//! Publishers: a backlog over 1,000 aggregates drained with `outbox.publishers` = 1, 2, 4 and
//! 8 (each a confirm-mode publisher on its own connection), against ONE bare amqprs publisher
//! sending the same messages (same properties and headers, same topic exchange, `mandatory`,
//! confirms, window 1,000, into the same kind of durable queue). Relay drains and bare runs
//! alternate, and each drain is compared with the bare runs just before and after it: the
//! machine's speed drifts by about 20% within a run.
//!
//! Then the same in a second scenario, "4 queues": the same events routed by aggregate to 4
//! durable queues (aggregate k with routing key `q{k mod 4}`, queue i bound to `q{i}`), drained
//! with `outbox.publishers` = 1 and 4, against one bare publisher and 4 bare publishers at once
//! sending the same messages with the same routing keys. One queue is one Erlang process on
//! the broker, one core at most; with several queues the broker can use more than one core.

use crate::cpu::{measure, rabbitmq_pid};
use crate::relay::{bounded_queue, published_total};
use crate::{progress, raw, Row};
use amqprs::callbacks::DefaultConnectionCallback;
use amqprs::channel::{BasicPublishArguments, ConfirmSelectArguments};
use amqprs::connection::{Connection, OpenConnectionArguments};
use pg_outbox_tests::{unique, wait_until, Broker, Cluster, BROKER_URL};
use std::collections::HashSet;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Aggregates the events are spread over, round robin.
const AGGREGATES: u64 = 1000;
/// Unconfirmed messages at most: the bare publisher's window and `outbox.max_in_flight`.
const WINDOW: u64 = 1000;
const COUNTS: [u32; 4] = [1, 2, 4, 8];
/// The count the goal is set for.
const TARGET_COUNT: u32 = 4;
/// Queues of the second scenario, and the publisher counts drained there.
const QUEUES: u64 = 4;
const QUEUES_COUNTS: [u32; 2] = [1, 4];

/// The routing key of aggregate `aggregate` with `queues` queues: the event type (pg_outbox's
/// default) with one queue bound to `#`, `q{aggregate mod queues}` with several.
fn routing_key(aggregate: u64, queues: u64) -> String {
    if queues == 1 {
        "FundsTransferEvent".to_string()
    } else {
        format!("q{}", aggregate % queues)
    }
}

/// `queues` durable queues bounded like [`bounded_queue`]: one bound to `#`, or queue i bound
/// to `q{i}`.
fn declare_queues(broker: &Broker, exchange: &str, queues: u64) -> Vec<String> {
    if queues == 1 {
        return vec![bounded_queue(broker, exchange)];
    }
    (0..queues)
        .map(|i| {
            let mut args = amqprs::FieldTable::new();
            args.insert("x-max-length".try_into().unwrap(), amqprs::FieldValue::l(10_000));
            args.insert(
                "x-overflow".try_into().unwrap(),
                amqprs::FieldValue::S("drop-head".try_into().unwrap()),
            );
            broker.declare_queue(exchange, &format!("q{i}"), args)
        })
        .collect()
}

/// Writes `count` events (about 100 bytes of JSON each) over [`AGGREGATES`] aggregates, event
/// `i` to aggregate `account-<i mod 1000>`, in transactions of 50,000; with several `queues`,
/// with the routing key `q<(i mod 1000) mod queues>`.
fn write_backlog(cluster: &Cluster, exchange: &str, count: u64, queues: u64) {
    let mut db = cluster.client();
    let mut done = 0u64;
    while done < count {
        let n = (count - done).min(50_000) as i64;
        db.execute(
            "SELECT outbox.publish('FundsTransferEvent',
                    jsonb_build_object('amount', 100, 'from', 'account-' || lpad((i % 1000)::text, 6, '0'),
                                       'to', 'account-' || lpad(((i + 1) % 1000)::text, 6, '0'),
                                       'currency', 'EUR', 'ref', lpad(i::text, 12, '0')),
                    aggregate_type => 'account',
                    aggregate_id => 'account-' || lpad((i % $4::int8)::text, 6, '0'),
                    exchange => $1,
                    routing_key => CASE WHEN $5::int8 > 1 THEN 'q' || ((i % $4::int8) % $5::int8)::text END)
               FROM generate_series($2::int8, $2::int8 + $3::int8 - 1) i",
            &[&exchange, &(done as i64), &n, &(AGGREGATES as i64), &(queues as i64)],
        )
        .unwrap();
        done += n as u64;
    }
}

/// A bare amqprs publisher: one connection, one confirm-mode channel, at most `window`
/// unconfirmed, `mandatory`, and the message the worker sends for the backlog's events (uuid
/// message id, type, content type, persistent, timestamp, app id, the two aggregate headers
/// with the same values, a body of the same length, the same routing key). Sends messages
/// `first..first + count`; returns when it started and when the last confirm came.
fn bare_publisher(exchange: &str, queues: u64, first: u64, count: u64, window: u64) -> (Instant, Instant) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    rt.block_on(async {
        let args = OpenConnectionArguments::new("127.0.0.1", 5672, "guest", "guest");
        let connection = Connection::open(&args).await.unwrap();
        connection.register_callback(DefaultConnectionCallback).await.unwrap();
        let channel = connection.open_channel(None).await.unwrap();
        let (tx, mut rx) = watch::channel(0u64);
        channel.register_callback(raw::ConfirmCounter::new(tx)).await.unwrap();
        channel.confirm_select(ConfirmSelectArguments::new(false)).await.unwrap();
        let args: Vec<BasicPublishArguments> = (0..queues)
            .map(|q| BasicPublishArguments::new(exchange, &routing_key(q, queues)).mandatory(true).finish())
            .collect();
        let started = Instant::now();
        for tag in 1..=count {
            while tag - *rx.borrow() > window {
                rx.changed().await.unwrap();
            }
            let n = first + tag - 1;
            let props = raw::properties(n, format!("account-{:06}", n % AGGREGATES));
            let args = args[((n % AGGREGATES) % queues) as usize].clone();
            channel.basic_publish(props, raw::body(n), args).await.unwrap();
        }
        while *rx.borrow() < count {
            tokio::time::timeout(Duration::from_secs(60), rx.changed()).await.unwrap().unwrap();
        }
        let finished = Instant::now();
        channel.close().await.ok();
        connection.close().await.ok();
        (started, finished)
    })
}

/// `parallel` bare publishers at once, each on its own connection with its share of the
/// messages and of the window; returns the rate from the first start to the last confirm.
fn bare_publishers(exchange: &str, queues: u64, count: u64, parallel: u64) -> f64 {
    let share = count / parallel;
    let spans: Vec<(Instant, Instant)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..parallel)
            .map(|k| {
                s.spawn(move || {
                    bare_publisher(exchange, queues, 1 + k * share, share, WINDOW.div_ceil(parallel))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let start = spans.iter().map(|s| s.0).min().unwrap();
    let end = spans.iter().map(|s| s.1).max().unwrap();
    (share * parallel) as f64 / (end - start).as_secs_f64()
}

/// Jiffies of the whole machine: (busy, total), from /proc/stat.
fn machine_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> =
        stat.lines().next().unwrap_or("").split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// Runs `f` and returns its result with the share of the machine's CPU that was busy meanwhile.
fn machine_busy<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let before = machine_jiffies();
    let result = f();
    let after = machine_jiffies();
    let busy = (after.0 - before.0) as f64 / (after.1 - before.1).max(1) as f64;
    (result, busy)
}

/// Established TCP connections of process `pid` to port 5672: the worker's publishers.
/// `None` when its file descriptors cannot be read.
fn broker_connections(pid: u32) -> Option<usize> {
    let inodes: HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let mut n = 0;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else { continue };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 9 && f[2].ends_with(":1628") && f[3] == "01" && inodes.contains(f[9]) {
                n += 1;
            }
        }
    }
    Some(n)
}

struct Drain {
    rate: f64,
    /// CPU per event, µs: the worker process (all its threads), RabbitMQ.
    worker_us: f64,
    rabbit_us: f64,
    /// Most connections to the broker the worker held at once while draining.
    connections: Option<usize>,
    /// Share of the machine's CPU busy meanwhile (everything on it).
    busy: f64,
}

struct Bare {
    rate: f64,
    /// RabbitMQ's CPU per message, µs.
    rabbit_us: f64,
    busy: f64,
}

/// The broker, the cluster and the exchange both scenarios use, and the queues of the
/// scenario running.
struct Bench<'a> {
    broker: &'a Broker,
    cluster: &'a Cluster,
    exchange: String,
    rabbit: u32,
    count: u64,
    queues: u64,
    names: Vec<String>,
}

impl Bench<'_> {
    /// Empties the scenario's queues (deletes and declares them again).
    fn reset_queues(&mut self) {
        for q in &self.names {
            self.broker.delete_queue(q);
        }
        self.names = declare_queues(self.broker, &self.exchange, self.queues);
    }

    fn label(&self) -> String {
        if self.queues == 1 {
            String::new()
        } else {
            format!(" ({} queues)", self.queues)
        }
    }

    /// `parallel` bare publishers at once (1: the baseline).
    fn bare_run(&mut self, parallel: u64) -> Bare {
        let count = self.count;
        progress(&format!(
            "{parallel} bare amqprs publisher(s){}: {count} messages over {AGGREGATES} aggregate ids, \
             at most {WINDOW} unconfirmed in all",
            self.label()
        ));
        let me = std::process::id();
        let ((rate, busy), _, cpu) = measure(&[me, self.rabbit], || {
            machine_busy(|| bare_publishers(&self.exchange, self.queues, count, parallel))
        });
        let per = (cpu[0] * 1e6 / count as f64, cpu[1] * 1e6 / count as f64);
        progress(&format!(
            "  {rate:.0} msgs/s; CPU per message: publisher {:.0} µs, RabbitMQ {:.0} µs; machine {:.0}% busy",
            per.0,
            per.1,
            busy * 100.0
        ));
        self.reset_queues();
        Bare { rate, rabbit_us: per.1, busy }
    }

    fn relay_run(&mut self, publishers: u32) -> Drain {
        let (cluster, count) = (self.cluster, self.count);
        let mut admin = cluster.admin();
        admin.batch_execute(&format!("ALTER SYSTEM SET outbox.publishers = {publishers}")).unwrap();
        admin.batch_execute("SELECT pg_reload_conf()").unwrap();
        wait_until(Duration::from_secs(30), "outbox.publishers to be reloaded", || {
            let shown: String = cluster.client().query_one("SHOW outbox.publishers", &[]).unwrap().get(0);
            (shown == publishers.to_string()).then_some(())
        });
        progress(&format!(
            "outbox.publishers = {publishers}{}: writing a backlog of {count} events",
            self.label()
        ));
        let t = Instant::now();
        write_backlog(cluster, &self.exchange, count, self.queues);
        progress(&format!("  written in {:.1?}; draining", t.elapsed()));
        let worker = cluster.wait_for_worker() as u32;
        let before = published_total(cluster);
        let mut connections: Option<usize> = None;
        let ((rate, busy), _, cpu) = measure(&[worker, self.rabbit], || {
            machine_busy(|| {
                let started = Instant::now();
                cluster.reconfigure(&[("outbox.amqp_url", BROKER_URL)]);
                wait_until(Duration::from_secs(600), "the backlog to drain", || {
                    if let Some(n) = broker_connections(worker) {
                        connections = Some(connections.unwrap_or(0).max(n));
                    }
                    (published_total(cluster) - before >= count as i64).then_some(())
                });
                count as f64 / started.elapsed().as_secs_f64()
            })
        });
        let drain = Drain {
            rate,
            worker_us: cpu[0] * 1e6 / count as f64,
            rabbit_us: cpu[1] * 1e6 / count as f64,
            connections,
            busy,
        };
        progress(&format!(
            "  drained at {rate:.0} events/s; CPU per event: worker {:.0} µs, RabbitMQ {:.0} µs; \
             machine {:.0}% busy; broker connections of the worker: {}",
            drain.worker_us,
            drain.rabbit_us,
            busy * 100.0,
            connections.map_or("unknown".to_string(), |n| n.to_string())
        ));
        if connections.is_some_and(|n| n != publishers as usize) {
            progress(&format!(
                "  NOTE: {publishers} publishers set, but the worker held {connections:?} connections"
            ));
        }
        cluster.cut_off_broker();
        self.reset_queues();
        drain
    }

    /// Runs a scenario with `queues` queues: one bare publisher, then each of `counts` drained
    /// followed by one bare publisher (and, after [`TARGET_COUNT`], [`TARGET_COUNT`] bare
    /// publishers at once before it), so each drain lies between two bare runs. Returns its
    /// rows, the queues deleted.
    fn scenario(&mut self, queues: u64, counts: &[u32]) -> Vec<Row> {
        self.queues = queues;
        self.names = declare_queues(self.broker, &self.exchange, queues);
        let mut bare = vec![self.bare_run(1)];
        let mut drains = Vec::new();
        let mut parallel = None;
        for &publishers in counts {
            drains.push(self.relay_run(publishers));
            if publishers == TARGET_COUNT {
                parallel = Some((bare.len(), self.bare_run(TARGET_COUNT as u64)));
            }
            bare.push(self.bare_run(1));
        }
        for q in std::mem::take(&mut self.names) {
            self.broker.delete_queue(&q);
        }

        let count = self.count;
        let (prefix, one_bare) = if queues == 1 {
            ("publishers:".to_string(), "one bare amqprs publisher".to_string())
        } else {
            (format!("publishers, {queues} queues:"), format!("one bare amqprs publisher, {queues} queues"))
        };
        // The runs of one bare publisher just before and after the measurement at `i`.
        let around = |i: usize| Bare {
            rate: (bare[i - 1].rate + bare[i].rate) / 2.0,
            rabbit_us: (bare[i - 1].rabbit_us + bare[i].rabbit_us) / 2.0,
            busy: (bare[i - 1].busy + bare[i].busy) / 2.0,
        };
        let mut rows: Vec<Row> = counts
            .iter()
            .zip(&drains)
            .enumerate()
            .map(|(i, (&publishers, d))| {
                let b = around(i + 1);
                let ratio = d.rate / b.rate;
                let target = publishers == TARGET_COUNT;
                Row {
                    figure: format!(
                        "{prefix} relay drains {count} events over {AGGREGATES} aggregates, outbox.publishers = {publishers}"
                    ),
                    value: format!(
                        "{:.0} events/s; CPU/event: worker {:.1} µs, RabbitMQ {:.1} µs; {} broker connections; machine {:.0}% busy",
                        d.rate,
                        d.worker_us,
                        d.rabbit_us,
                        d.connections.map_or("?".to_string(), |n| n.to_string()),
                        d.busy * 100.0
                    ),
                    baseline: format!(
                        "{:.0} msgs/s {one_bare} (runs {:.0}, {:.0}); RabbitMQ {:.1} µs CPU/msg; machine {:.0}% busy",
                        b.rate,
                        bare[i].rate,
                        bare[i + 1].rate,
                        b.rabbit_us,
                        b.busy * 100.0
                    ),
                    ratio: Some(ratio),
                    target: if target { "≥ 100% of one bare publisher".into() } else { "reported".into() },
                    met: target.then_some(ratio >= 1.0),
                }
            })
            .collect();
        if let Some((i, p)) = parallel {
            let b = around(i);
            rows.push(Row {
                figure: format!(
                    "{prefix} {TARGET_COUNT} bare amqprs publishers at once (own connections, {} unconfirmed each)",
                    WINDOW.div_ceil(TARGET_COUNT as u64)
                ),
                value: format!(
                    "{:.0} msgs/s; RabbitMQ {:.1} µs CPU/msg; machine {:.0}% busy",
                    p.rate,
                    p.rabbit_us,
                    p.busy * 100.0
                ),
                baseline: format!("{:.0} msgs/s {one_bare} (runs {:.0}, {:.0})", b.rate, bare[i - 1].rate, bare[i].rate),
                ratio: Some(p.rate / b.rate),
                target: "context: what more connections give the broker".into(),
                met: None,
            });
        }
        rows
    }
}

pub fn publishers(count: u64) -> Vec<Row> {
    let broker = Broker::connect();
    let exchange = unique("bench.publishers");
    broker.exchange(&exchange);
    let unreachable = pg_outbox_tests::unreachable_broker_url();
    let cluster = Cluster::start(&crate::settings(&[
        ("outbox.amqp_url", unreachable.as_str()),
        ("outbox.max_in_flight", "1000"),
        ("outbox.batch_size", "1000"),
    ]));
    cluster.wait_for_worker();
    let has_setting: bool = cluster
        .client()
        .query_one("SELECT count(*) > 0 FROM pg_settings WHERE name = 'outbox.publishers'", &[])
        .unwrap()
        .get(0);
    let mut bench = Bench {
        broker: &broker,
        cluster: &cluster,
        exchange: exchange.clone(),
        rabbit: rabbitmq_pid().unwrap_or(0),
        count,
        queues: 1,
        names: Vec::new(),
    };

    if !has_setting {
        progress("outbox.publishers does not exist in this build: only the bare publisher ran");
        bench.names = declare_queues(&broker, &exchange, 1);
        let b = bench.bare_run(1);
        for q in std::mem::take(&mut bench.names) {
            broker.delete_queue(&q);
        }
        broker.delete_exchange(&exchange);
        return vec![Row {
            figure: format!(
                "publishers: one bare amqprs publisher, {count} messages over {AGGREGATES} aggregate ids"
            ),
            value: "outbox.publishers missing".into(),
            baseline: format!("{:.0} msgs/s (RabbitMQ {:.0} µs CPU/msg)", b.rate, b.rabbit_us),
            ratio: None,
            target: "≥ 100% of one bare publisher with 4 publishers".into(),
            met: None,
        }];
    }
    let mut rows = bench.scenario(1, &COUNTS);
    rows.extend(bench.scenario(QUEUES, &QUEUES_COUNTS));
    broker.delete_exchange(&exchange);
    rows
}
