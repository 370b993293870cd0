//! Writers that keep committing events while a test breaks things, and the verdict on what
//! arrived.
//!
//! Each transaction writes its events with `outbox.publish` and records them in a `ledger`
//! table in the same transaction, so after any crash the ledger says exactly which events
//! committed, whatever the client saw. Writers reconnect after errors and go on. Some
//! transactions are rolled back on purpose; their ids must never arrive.
//!
//! Within an aggregate the ledger's `seq` is commit order: `outbox.publish` takes the
//! aggregate's lock before the ledger row gets its sequence value, and holds it to commit.

use crate::broker::Delivery;
use crate::cluster::Cluster;
use postgres::{Client, NoTls};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use uuid::Uuid;

#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub writers: usize,
    /// Events are spread over this many aggregates (`agg-0` ...).
    pub aggregates: usize,
    pub exchange: String,
    /// Every n-th transaction is rolled back.
    pub rollback_every: u64,
    /// Events per transaction vary from 1 to this.
    pub max_events_per_transaction: u64,
    /// Pause between transactions of one writer.
    pub pause: Duration,
}

impl LoadSpec {
    pub fn new(exchange: &str) -> LoadSpec {
        LoadSpec {
            writers: 4,
            aggregates: 40,
            exchange: exchange.to_string(),
            rollback_every: 10,
            max_events_per_transaction: 5,
            pause: Duration::from_millis(2),
        }
    }
}

pub struct Load {
    stop: Arc<AtomicBool>,
    writers: Vec<JoinHandle<Vec<Uuid>>>,
    /// Transactions that committed as far as the client knows.
    pub commits: Arc<AtomicU64>,
    /// Statements that failed (connection lost, server restarting).
    pub errors: Arc<AtomicU64>,
}

pub const LEDGER: &str = "CREATE TABLE IF NOT EXISTS ledger (
    seq        bigserial PRIMARY KEY,
    message_id uuid NOT NULL,
    aggregate  text NOT NULL)";

impl Load {
    pub fn start(cluster: &Cluster, spec: LoadSpec) -> Load {
        cluster.client().batch_execute(LEDGER).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let commits = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let conninfo = format!("host=127.0.0.1 port={} user=postgres dbname={}", cluster.port, crate::DB);
        let writers = (0..spec.writers)
            .map(|w| {
                let (stop, commits, errors, spec, conninfo) =
                    (stop.clone(), commits.clone(), errors.clone(), spec.clone(), conninfo.clone());
                std::thread::spawn(move || writer(w as u64, &conninfo, &spec, &stop, &commits, &errors))
            })
            .collect();
        Load { stop, writers, commits, errors }
    }

    /// Stops the writers; returns the ids of the events they rolled back.
    pub fn stop(self) -> HashSet<Uuid> {
        self.stop.store(true, Ordering::SeqCst);
        self.writers.into_iter().flat_map(|w| w.join().unwrap()).collect()
    }
}

fn writer(
    w: u64,
    conninfo: &str,
    spec: &LoadSpec,
    stop: &AtomicBool,
    commits: &AtomicU64,
    errors: &AtomicU64,
) -> Vec<Uuid> {
    let mut rolled_back = Vec::new();
    let mut client: Option<Client> = None;
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ (w + 1);
    let mut tx_number: u64 = 0;
    let mut n: u64 = 0;
    while !stop.load(Ordering::SeqCst) {
        let c = match client.as_mut() {
            Some(c) if !c.is_closed() => c,
            _ => match Client::connect(conninfo, NoTls) {
                Ok(c) => client.insert(c),
                Err(_) => {
                    errors.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
            },
        };
        tx_number += 1;
        let rollback = spec.rollback_every > 0 && tx_number.is_multiple_of(spec.rollback_every);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let events = 1 + x % spec.max_events_per_transaction;
        let result = (|| -> Result<Vec<Uuid>, postgres::Error> {
            let mut tx = c.transaction()?;
            let mut ids = Vec::new();
            for e in 0..events {
                let aggregate = format!("agg-{}", (x >> 8).wrapping_add(e * 7) % spec.aggregates as u64);
                n += 1;
                let id: Uuid = tx
                    .query_one(
                        "SELECT outbox.publish('Load', jsonb_build_object('writer', $1::int8, 'n', $2::int8),
                                               aggregate_type => 'load', aggregate_id => $3, exchange => $4)",
                        &[&(w as i64), &(n as i64), &aggregate, &spec.exchange],
                    )?
                    .get(0);
                tx.execute("INSERT INTO ledger (message_id, aggregate) VALUES ($1, $2)", &[&id, &aggregate])?;
                ids.push(id);
            }
            if rollback {
                tx.rollback()?;
            } else {
                tx.commit()?;
            }
            Ok(ids)
        })();
        match result {
            Ok(ids) if rollback => rolled_back.extend(ids),
            Ok(_) => {
                commits.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                errors.fetch_add(1, Ordering::Relaxed);
                client = None;
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        std::thread::sleep(spec.pause);
    }
    rolled_back
}

/// What arrived compared with what committed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Events committed (rows of the ledger).
    pub committed: usize,
    pub received_unique: usize,
    pub duplicates: usize,
    /// Committed but never received: must be 0.
    pub lost: usize,
    /// Received before an earlier-committed event of the same aggregate (first deliveries):
    /// must be 0.
    pub order_violations: usize,
    /// Rolled back but received: must be 0.
    pub rolled_back_received: usize,
    /// Received, yet neither committed nor rolled back as far as we know: must be 0.
    pub unknown_received: usize,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "committed {}, received {} unique, duplicates {}, lost {}, order violations {}, rolled-back received {}, unknown received {}",
            self.committed,
            self.received_unique,
            self.duplicates,
            self.lost,
            self.order_violations,
            self.rolled_back_received,
            self.unknown_received
        )
    }
}

impl Verdict {
    pub fn assert_clean(&self) {
        assert_eq!(self.lost, 0, "{self}");
        assert_eq!(self.order_violations, 0, "{self}");
        assert_eq!(self.rolled_back_received, 0, "{self}");
        assert_eq!(self.unknown_received, 0, "{self}");
        assert!(self.committed > 0, "{self}");
    }
}

/// Reads the ledger and judges `deliveries` (in the order a single consumer received them).
pub fn verify(cluster: &Cluster, deliveries: &[Delivery], rolled_back: &HashSet<Uuid>) -> Verdict {
    let ledger: Vec<(Uuid, String, i64)> = cluster
        .client()
        .query("SELECT message_id, aggregate, seq FROM ledger ORDER BY seq", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let committed: HashMap<Uuid, (String, i64)> = ledger.into_iter().map(|(id, a, s)| (id, (a, s))).collect();
    let mut seen: HashSet<Uuid> = HashSet::new();
    let mut last_seq: HashMap<String, i64> = HashMap::new();
    let mut v = Verdict { committed: committed.len(), ..Default::default() };
    for d in deliveries {
        let id: Uuid = d.message_id.as_deref().and_then(|s| s.parse().ok()).expect("message id");
        if !seen.insert(id) {
            v.duplicates += 1;
            continue;
        }
        match committed.get(&id) {
            Some((aggregate, seq)) => {
                let last = last_seq.entry(aggregate.clone()).or_insert(0);
                if *seq < *last {
                    v.order_violations += 1;
                }
                *last = (*last).max(*seq);
            }
            None if rolled_back.contains(&id) => v.rolled_back_received += 1,
            None => v.unknown_received += 1,
        }
    }
    v.received_unique = seen.len();
    v.lost = committed.keys().filter(|id| !seen.contains(id)).count();
    v
}
